"""An edge device simulated honestly: a child process under a cgroup (v1) memory limit.

The page cache a process causes is charged to its cgroup, so a mapped model larger than the limit really
pages from storage. The child is moved into the cgroup before it execs (nothing it loads escapes).
"""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import runtime

V1_ROOT = Path("/sys/fs/cgroup/memory")


def own_memory_cgroup() -> Path | None:
    """This process's cgroup-v1 memory directory, if it exists and we may create children in it."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                path = V1_ROOT / rel.lstrip("/")
                if (path / "memory.limit_in_bytes").exists() and os.access(path, os.W_OK):
                    return path
    except OSError:
        pass
    return None


UNLIMITED = 1 << 60     # cgroup v1 reports "no limit" as a page-rounded 2**63 - 1


def memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v1 memory.limit_in_bytes or v2 memory.max), if any."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            rel = rel.lstrip("/")
            if "memory" in controllers.split(","):
                path = V1_ROOT / rel / "memory.limit_in_bytes"
            elif controllers == "":
                path = Path("/sys/fs/cgroup") / rel / "memory.max"
            else:
                continue
            if path.exists():
                text = path.read_text().strip()
                if text != "max" and int(text) < UNLIMITED:
                    return int(text)
    except (OSError, ValueError):
        pass
    return None


@dataclass
class LimitedRun:
    returncode: int
    stdout: str
    stderr: str
    limit_bytes: int
    peak_bytes: int
    failcnt: int
    oom_kills: int
    wall_s: float


def drop_file_cache(path: str | os.PathLike) -> None:
    """Cold start for one file: ask the kernel to drop its clean page-cache pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        runtime.flush(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_limited(cmd: list[str], limit_bytes: int, *, timeout: float | None = None,
                env: dict | None = None) -> LimitedRun:
    """Run `cmd` in a fresh child cgroup limited to `limit_bytes` (memory + page cache)."""
    parent = own_memory_cgroup()
    if parent is None:
        raise RuntimeError("no writable cgroup-v1 memory controller here: cannot impose a memory limit")
    cg = parent / f"edgemoe-{uuid.uuid4().hex[:12]}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap_limit = cg / "memory.memsw.limit_in_bytes"
        if swap_limit.exists():
            swap_limit.write_text(str(limit_bytes))      # no swap escape hatch either
        procs = str(cg / "cgroup.procs")

        def enter():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              preexec_fn=enter, check=False)
        wall = time.perf_counter() - t0
        oom = 0
        for line in (cg / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                oom = int(line.split()[1])
        return LimitedRun(proc.returncode, proc.stdout, proc.stderr, limit_bytes,
                          int((cg / "memory.max_usage_in_bytes").read_text()),
                          int((cg / "memory.failcnt").read_text()), oom, wall)
    finally:
        try:
            (cg / "memory.force_empty").write_text("0")
        except OSError:
            pass
        cg.rmdir()
