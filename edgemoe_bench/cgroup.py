"""An edge device simulated honestly: a child process under a cgroup memory limit, v1 or v2.

The page cache a process causes is charged to its cgroup, so a mapped model larger than the limit really
pages from storage. The child is moved into the cgroup before it execs (nothing it loads escapes).

cgroup v1: the run's cgroup is a child of this process's memory cgroup (`memory.limit_in_bytes`,
`memory.max_usage_in_bytes`, `memory.failcnt`, `oom_kill` in `memory.oom_control`).

cgroup v2: the run's cgroup needs `memory` in its parent's `cgroup.subtree_control`, and a cgroup whose
children have controllers may hold no processes itself (the "no internal processes" rule). Where this
process's parent cgroup may be written, the runs' cgroups go there, beside this process's own (`+memory` is
enabled in the parent and the ancestors that lack it, where permitted). Where only its own cgroup may be
written (delegated to it alone, e.g. `systemd-run --scope -p Delegate=yes`) and it holds no other process,
`prepare` moves this process into a leaf `edgemoe-driver` and enables `+memory` in its old cgroup, whose
children the runs then are.
Figures: `memory.max`, `memory.peak` (or `memory.current` sampled where the kernel has no memory.peak),
`max` and `oom_kill` in `memory.events`.

Where neither works, `memory_controller()` says why (`Controller.reason`). Every path below is a
module-level name so the tests can point them at a fake tree.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from edgemoe_llamacpp import limits, pages

DRIVER_LEAF = "edgemoe-driver"                # v2: where this process goes when only its own cgroup is writable
SAMPLE_S = 0.01                               # v2 without memory.peak: memory.current sampled this often

@dataclass(frozen=True)
class Controller:
    """Where the runs' memory-limited cgroups go. kind: "cgroup-v1", "cgroup-v2" or "none"; path: the cgroup
    the runs' cgroups are created in; reason: why none, or how the limit is imposed; setup (v2): what `prepare`
    still has to do: ancestors to enable +memory in, and whether this process must move to a leaf first."""
    kind: str
    path: Path | None
    reason: str
    enable: tuple[Path, ...] = ()
    vacate: bool = False

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": None if self.path is None else str(self.path), "reason": self.reason}


def _none(reason: str) -> Controller:
    return Controller("none", None, reason)


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _pids(cg: Path) -> set[int]:
    try:
        return {int(x) for x in (cg / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return set()


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _write(path: Path, text: str) -> None:
    """Write one cgroup interface file (the kernel applies it, or refuses with an OSError)."""
    with open(path, "w") as f:
        f.write(text)


RMCG_TRIES = 200            # 10 ms apart: a killed process is gone within a few


def _mkcg(path: Path) -> None:
    """Create a cgroup (the kernel fills in its interface files)."""
    path.mkdir()


def _rmcg(path: Path) -> None:
    """Remove a child cgroup, first killing what is left in it: an interrupted run's process may still be
    exiting (the kernel refuses to remove a cgroup with a task in it)."""
    for _ in range(RMCG_TRIES):
        try:
            path.rmdir()
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    path.rmdir()


def _v1_controller(mounts, rel) -> Controller:
    if rel is None:
        return _none("cgroup v1: this process is in no memory cgroup (/proc/self/cgroup)")
    found = limits.locate(mounts, rel)
    if found is None:
        return _none(f"cgroup v1: the memory cgroup {rel} is not under a mounted memory hierarchy")
    path = found[1]
    if not (path / "memory.limit_in_bytes").exists():
        return _none(f"cgroup v1: {path}/memory.limit_in_bytes does not exist")
    if not _writable(path):
        return _none(f"cgroup v1: {path} is not writable by this user, so no child cgroup can be created")
    return Controller("cgroup-v1", path, f"cgroup v1 memory controller, runs in children of {path}")


def _v2_controller(mounts, rel) -> Controller:
    if rel is None:
        return _none("cgroup v2: this process has no cgroup-v2 entry (0::) in /proc/self/cgroup")
    found = limits.locate(mounts, rel)
    if found is None:
        return _none(f"cgroup v2: no cgroup2 mount shows {rel}")
    point, own = found
    if not (own / "cgroup.controllers").is_file():
        return _none(f"cgroup v2: {own}/cgroup.controllers does not exist")
    root_ctl = _words(point / "cgroup.controllers")
    if "memory" not in root_ctl:
        return _none(f"cgroup v2 ({point}): memory is not one of its controllers (cgroup.controllers: "
                     f"{' '.join(sorted(root_ctl)) or 'empty'}); on a hybrid host it is bound to cgroup v1")
    if "memory" in _words(own / "cgroup.subtree_control"):         # only the root may hold processes then
        if not _writable(own):
            return _none(f"cgroup v2: {own} is not writable by this user, so no child cgroup can be created")
        return Controller("cgroup-v2", own, f"cgroup v2 memory controller, runs in children of {own}")
    # ancestors (mount point down to own's parent) that do not yet hand memory on to their children
    chain = [point, *reversed([p for p in own.parents if p.is_relative_to(point) and p != point])] \
        if own != point else []
    enable = tuple(p for p in chain if "memory" not in _words(p / "cgroup.subtree_control"))
    blocked = next((p for p in enable if not _writable(p / "cgroup.subtree_control")), None)
    if blocked is not None:
        return _none(f"cgroup v2: memory is not enabled in {blocked}/cgroup.subtree_control, and that file is not "
                     f"writable by this user (the cgroup is not delegated)")
    parent = own.parent
    if own != point and _writable(parent) and _writable(parent / "cgroup.procs"):
        return Controller("cgroup-v2", parent, f"cgroup v2 memory controller, runs in children of {parent}, "
                          f"beside this process's cgroup", enable)
    # only this process's own cgroup may be written (delegated to it alone): runs go below it, and it must
    # hold no process itself once its children have memory, so this process moves to a leaf first
    if not (_writable(own) and _writable(own / "cgroup.subtree_control") and _writable(own / "cgroup.procs")):
        return _none(f"cgroup v2: neither {own} (this process's cgroup) nor its parent is writable by this user "
                     f"(not delegated): no cgroup can be created for a run")
    others = sorted(_pids(own) - {os.getpid()})
    if others:
        return _none(f"cgroup v2: cannot enable memory in {own}/cgroup.subtree_control: it holds "
                     f"{len(others)} other process(es) (pids {', '.join(map(str, others[:5]))}), and a cgroup "
                     f"whose children have controllers may hold none itself (the no-internal-processes rule); "
                     f"run in a cgroup of its own, e.g. systemd-run --user --scope -p Delegate=yes ...")
    return Controller("cgroup-v2", own, f"cgroup v2 memory controller, runs in children of {own} (this process "
                      f"moves to {own / DRIVER_LEAF} so memory can be enabled for them)", enable, vacate=True)


def memory_controller() -> Controller:
    """Where a memory limit can be imposed on a child, or why it cannot (nothing is written)."""
    try:
        v1_mounts, v2_mounts = limits.mounts()
        v1_rel, v2_rel = limits.own_cgroups()
    except (OSError, ValueError) as e:
        return _none(f"cannot read this process's cgroups ({e})")
    v1 = _v1_controller(v1_mounts, v1_rel) if v1_mounts else _none("cgroup v1: no memory hierarchy is mounted")
    if v1.kind != "none":
        return v1
    v2 = _v2_controller(v2_mounts, v2_rel) if v2_mounts else _none("cgroup v2: no cgroup2 file system is mounted")
    if v2.kind != "none":
        return v2
    return _none(f"no writable cgroup memory controller: {v1.reason}; {v2.reason}")


def _refused(what: str, e: OSError) -> Controller:
    why = " (the no-internal-processes rule: a process is in that cgroup)" if e.errno == errno.EBUSY else ""
    return _none(f"cgroup v2: {what} failed: {e.strerror}{why}")


def prepare(ctrl: Controller | None = None) -> Controller:
    """Do what a v2 controller still needs (enable +memory down the chain, move this process to a leaf);
    returns the controller ready for runs, or kind "none" with the reason the kernel gave."""
    ctrl = memory_controller() if ctrl is None else ctrl
    if ctrl.kind != "cgroup-v2" or not (ctrl.enable or ctrl.vacate):
        return ctrl
    try:
        for p in ctrl.enable:
            _write(p / "cgroup.subtree_control", "+memory")
    except OSError as e:
        return _refused(f"enabling memory in {p}/cgroup.subtree_control", e)
    how = ctrl.reason
    if ctrl.vacate:
        own, leaf = ctrl.path, ctrl.path / DRIVER_LEAF
        try:
            if not leaf.is_dir():
                _mkcg(leaf)
            _write(leaf / "cgroup.procs", str(os.getpid()))
        except OSError as e:
            return _refused(f"moving this process into {leaf}", e)
        try:
            _write(own / "cgroup.subtree_control", "+memory")
        except OSError as e:
            try:
                _write(own / "cgroup.procs", str(os.getpid()))
            except OSError:
                pass
            return _refused(f"enabling memory in {own}/cgroup.subtree_control", e)
        how = f"cgroup v2 memory controller, runs in children of {own} (this process moved to {leaf})"
    return Controller("cgroup-v2", ctrl.path, how)


def own_memory_cgroup() -> Path | None:
    """The cgroup (v1 or v2) the runs' memory-limited cgroups are created in, if there is one."""
    return memory_controller().path


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
    kind: str = "none"


WARM_CHUNK = 8 << 20      # the warm read's piece: sequential, large enough for full disk speed


def warm_file_cache(path: str | os.PathLike) -> int:
    """Read `path` whole, sequentially, into the page cache (a warm start); the bytes of it cached afterwards
    (mincore: less than the file where memory could not hold it all)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(WARM_CHUNK)
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)
    return pages.file_cached_bytes(path)


def _events(path: Path) -> dict[str, int]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


class _Sampler(threading.Thread):
    """The largest memory.current seen while a run lasts (kernels before 5.19 have no memory.peak)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.peak, self.done = path, 0, threading.Event()

    def sample(self) -> None:
        try:
            self.peak = max(self.peak, int(self.path.read_text()))
        except (OSError, ValueError):
            pass

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.sample()

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.sample()
        return self.peak


PR_SET_PDEATHSIG = 1      # linux/prctl.h


def die_with_parent() -> None:
    """In a child between fork and exec: the kernel kills it when the process that started it dies, so an
    interrupted benchmark leaves no run behind holding memory, the disk and the CPUs."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_limited(cmd: list[str], limit_bytes: int, *, timeout: float | None = None, env: dict | None = None,
                controller: Controller | None = None) -> LimitedRun:
    """Run `cmd` in a fresh child cgroup limited to `limit_bytes` (memory + page cache, no swap)."""
    ctrl = prepare(controller)
    if ctrl.kind == "none":
        raise RuntimeError(f"cannot impose a memory limit: {ctrl.reason}")
    v2 = ctrl.kind == "cgroup-v2"
    cg = ctrl.path / f"edgemoe-{uuid.uuid4().hex[:12]}"
    _mkcg(cg)
    try:
        if v2:
            _write(cg / "memory.max", str(limit_bytes))
            if (cg / "memory.swap.max").exists():
                _write(cg / "memory.swap.max", "0")            # no swap escape hatch either
        else:
            _write(cg / "memory.limit_in_bytes", str(limit_bytes))
            swap_limit = cg / "memory.memsw.limit_in_bytes"
            if swap_limit.exists():
                _write(swap_limit, str(limit_bytes))
        procs = cg / "cgroup.procs"

        def enter():
            die_with_parent()
            _write(procs, str(os.getpid()))

        sampler = _Sampler(cg / "memory.current") if v2 and not (cg / "memory.peak").exists() else None
        if sampler:
            sampler.start()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                  preexec_fn=enter, check=False)
        finally:
            sampled = sampler.stop() if sampler else None
        wall = time.perf_counter() - t0
        if v2:
            events = _events(cg / "memory.events")
            peak = sampled if sampler else int((cg / "memory.peak").read_text())
            return LimitedRun(proc.returncode, proc.stdout, proc.stderr, limit_bytes, peak, events.get("max", 0),
                              events.get("oom_kill", 0), wall, ctrl.kind)
        oom = _events(cg / "memory.oom_control").get("oom_kill", 0)
        return LimitedRun(proc.returncode, proc.stdout, proc.stderr, limit_bytes,
                          int((cg / "memory.max_usage_in_bytes").read_text()),
                          int((cg / "memory.failcnt").read_text()), oom, wall, ctrl.kind)
    finally:
        try:        # release the page cache charged to it before it goes (v1 force_empty, v2 memory.reclaim)
            if v2:
                _write(cg / "memory.reclaim", str(max(limit_bytes, 1 << 20)))
            else:
                _write(cg / "memory.force_empty", "0")
        except OSError:
            pass
        _rmcg(cg)
