"""The memory limit this process runs under, read from its cgroup (v1 or v2), and a cold start for files.

Every path below is a module-level name so the tests can point them at a fake tree.
"""
from __future__ import annotations

import os
from pathlib import Path

from edgemoe_llamacpp import pages

PROC_CGROUP = Path("/proc/self/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
V1_ROOT = Path("/sys/fs/cgroup/memory")       # where /proc/self/mountinfo cannot be read
V2_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60     # cgroup v1 reports "no limit" as a page-rounded 2**63 - 1



def mounts() -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(v1 memory mounts, cgroup2 mounts) as (mount point, root of the hierarchy mounted there)."""
    v1, v2 = [], []
    try:
        text = MOUNTINFO.read_text()
    except OSError:
        return [(V1_ROOT, "/")] if V1_ROOT.is_dir() else [], [(V2_ROOT, "/")]
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        point = Path(fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
                     .replace("\\134", "\\"))
        if fstype == "cgroup" and "memory" in options.split(","):
            v1.append((point, fields[3]))
        elif fstype == "cgroup2":
            v2.append((point, fields[3]))
    return v1, v2


def own_cgroups() -> tuple[str | None, str | None]:
    """This process's (v1 memory cgroup, v2 cgroup) as paths inside their hierarchies."""
    v1 = v2 = None
    for line in PROC_CGROUP.read_text().splitlines():
        hid, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1 = rel
        elif hid == "0" and controllers == "":
            v2 = rel
    return v1, v2


def locate(mounts: list[tuple[Path, str]], rel: str) -> tuple[Path, Path] | None:
    """(mount point, directory of cgroup `rel`) in the first mount that shows it."""
    for point, root in mounts:
        r = root.rstrip("/")
        if rel == r or rel.startswith(r + "/"):
            return point, point / rel[len(r):].lstrip("/")
    return None


def memory_limit() -> int | None:
    """The memory limit this process runs under: the smallest v1 memory.limit_in_bytes or v2 memory.max of
    its cgroup and every ancestor (a limit on a parent holds for the children too), if any."""
    try:
        v1_mounts, v2_mounts = mounts()
        v1_rel, v2_rel = own_cgroups()
    except (OSError, ValueError):
        return None
    limits = []
    for found_in, rel, name in ((v1_mounts, v1_rel, "memory.limit_in_bytes"), (v2_mounts, v2_rel, "memory.max")):
        found = None if rel is None else locate(found_in, rel)
        if found is None:
            continue
        point, own = found
        for p in (own, *(q for q in own.parents if q.is_relative_to(point))):
            try:
                text = (p / name).read_text().strip()
            except OSError:
                continue
            if text != "max" and text.isdigit() and int(text) < UNLIMITED:
                limits.append(int(text))
    return min(limits) if limits else None


def drop_file_cache(*paths: str | os.PathLike) -> None:
    """Cold start for files (a model's, every shard of a split one): ask the kernel to drop their clean page-cache
    pages."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            pages.flush(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
