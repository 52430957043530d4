"""Memory limits on cgroup v1 and v2.

This host has cgroup v1 with a writable memory controller, and a cgroup2 mount without it, so the v2 code
paths run against a fake tree: a temporary directory laid out like /sys/fs/cgroup, a fake /proc/self/mountinfo
and /proc/self/cgroup ("0::/some/path"), and a fake kernel (FakeKernel) that applies writes as cgroup v2
does: `+memory` only where the parent hands memory on, no processes in a cgroup whose children have
controllers (the no-internal-processes rule), a process moved by writing its pid to cgroup.procs. The real
controller (whichever this host has) is tested at the end.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from edgemoe_bench import cgroup
from edgemoe_llamacpp import limits
from edgemoe_llamacpp.errors import BudgetError
from edgemoe_llamacpp.gguf.layout import read_layout

OTHER_PID = 999_999_999         # a process that is not this one


class FakeKernel:
    """cgroup v2 under `mount`, with this process in /`own`."""

    def __init__(self, tmp: Path, monkeypatch, *, own: str = "some/path", root_controllers: str = "cpu io memory pids",
                 enabled: tuple[str, ...] = ("", "some"), others: tuple[int, ...] = (), peak: bool = True):
        self.mount, self.peak, self.pid = tmp / "cgroup", peak, os.getpid()
        self.proc_cgroup, mountinfo = tmp / "proc-self-cgroup", tmp / "mountinfo"
        mountinfo.write_text(f"41 31 0:38 / {self.mount} rw,relatime - cgroup2 cgroup2 rw\n")
        self.mount.mkdir()
        for name, text in (("cgroup.controllers", root_controllers), ("cgroup.subtree_control", ""),
                           ("cgroup.procs", "1\n")):
            (self.mount / name).write_text(text)
        path = self.mount
        for part in own.split("/"):
            self.mkcg(path / part)
            path = path / part
        for rel in enabled:       # memory handed on below these cgroups, as a delegating manager would
            self.write(self.mount / rel / "cgroup.subtree_control", "+memory")
        self.write(path / "cgroup.procs", str(self.pid))
        for pid in others:
            (path / "cgroup.procs").write_text((path / "cgroup.procs").read_text() + f"{pid}\n")
        self.own = path
        monkeypatch.setattr(limits, "MOUNTINFO", mountinfo)
        monkeypatch.setattr(limits, "PROC_CGROUP", self.proc_cgroup)
        monkeypatch.setattr(cgroup, "_mkcg", self.mkcg)
        monkeypatch.setattr(cgroup, "_rmcg", self.rmcg)
        monkeypatch.setattr(cgroup, "_write", self.write)

    @staticmethod
    def words(path: Path) -> set[str]:
        return set(path.read_text().split())

    def mkcg(self, path: Path) -> None:
        path.mkdir()
        files = {"cgroup.controllers": " ".join(sorted(self.words(path.parent / "cgroup.subtree_control"))),
                 "cgroup.subtree_control": "", "cgroup.procs": "", "cgroup.events": "populated 0\n"}
        if "memory" in files["cgroup.controllers"]:
            files.update({"memory.max": "max\n", "memory.current": "0\n", "memory.swap.max": "max\n",
                          "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"})
            if self.peak:
                files["memory.peak"] = "0\n"
        for name, text in files.items():
            (path / name).write_text(text)

    def rmcg(self, path: Path) -> None:
        live = [p for p in (path / "cgroup.procs").read_text().split() if Path(f"/proc/{p}").exists()]
        assert not live, "rmdir of a populated cgroup: EBUSY"          # exited processes have left it
        assert not [p for p in path.iterdir() if p.is_dir()], "rmdir of a cgroup with children: EBUSY"
        shutil.rmtree(path)

    def cgroups(self):
        return [self.mount, *(p for p in self.mount.rglob("*") if p.is_dir())]

    def write(self, path: Path, text: str) -> None:
        cg, name = path.parent, path.name
        if name == "cgroup.subtree_control":
            enabled = self.words(path)
            for token in text.split():
                ctl = token[1:]
                if token[0] == "+" and ctl not in self.words(cg / "cgroup.controllers"):
                    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))         # as the kernel says it
                if cg != self.mount and (cg / "cgroup.procs").read_text().split():
                    raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))           # no internal processes
                enabled = enabled | {ctl} if token[0] == "+" else enabled - {ctl}
            path.write_text(" ".join(sorted(enabled)))
            for child in (p for p in cg.iterdir() if p.is_dir()):
                (child / "cgroup.controllers").write_text(" ".join(sorted(enabled)))
        elif name == "cgroup.procs":
            pid = int(text)
            if cg != self.mount and self.words(cg / "cgroup.subtree_control"):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            for other in self.cgroups():
                pids = [p for p in (other / "cgroup.procs").read_text().split() if int(p) != pid]
                (other / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
            (cg / "cgroup.procs").write_text((cg / "cgroup.procs").read_text() + f"{pid}\n")
            if pid == self.pid:
                self.proc_cgroup.write_text(f"0::/{cg.relative_to(self.mount)}\n".replace("/.", ""))
        else:
            path.write_text(text)


# The run's command: find its own cgroup by its pid, check the limit, then act as the kernel would (charge a
# peak, count limit hits and an OOM kill), so the figures run_limited reports can be checked.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
parent, peak = Path(sys.argv[1]), sys.argv[2]
mine = [d for d in parent.glob("edgemoe-*") if str(os.getpid()) in (d / "cgroup.procs").read_text().split()]
assert len(mine) == 1, "not moved into its cgroup before exec"
cg = mine[0]
def put(name, text):
    tmp = cg / (name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, cg / name)
if peak == "peak":
    put("memory.peak", "123456789\n")
else:
    for value in ("1000", "7777777", "2000"):
        put("memory.current", value + "\n")
        time.sleep(0.3)
put("memory.events", "low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\noom_group_kill 0\n")
print(json.dumps({"memory.max": (cg / "memory.max").read_text().strip(),
                  "memory.swap.max": (cg / "memory.swap.max").read_text().strip(), "cgroup": cg.name}))
"""


def only_own_writable(monkeypatch, k: FakeKernel) -> None:
    """As a user to whom only this process's own cgroup is delegated."""
    monkeypatch.setattr(cgroup, "_writable", lambda p: p == k.own or k.own in p.parents)


def test_v2_runs_beside_this_process_where_the_parent_hands_on_memory(tmp_path, monkeypatch):
    k = FakeKernel(tmp_path, monkeypatch)
    ctrl = cgroup.memory_controller()
    assert (ctrl.kind, ctrl.path, ctrl.enable, ctrl.vacate) == ("cgroup-v2", k.own.parent, (), False), ctrl
    assert cgroup.own_memory_cgroup() == k.own.parent
    run = cgroup.run_limited([sys.executable, "-c", CHILD, str(k.own.parent), "peak"], 300 << 20, timeout=60)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["memory.max"] == str(300 << 20) and seen["memory.swap.max"] == "0"
    assert (run.kind, run.peak_bytes, run.oom_kills, run.failcnt) == ("cgroup-v2", 123456789, 2, 5)
    assert not (k.own.parent / seen["cgroup"]).exists()                # removed after the run
    assert k.proc_cgroup.read_text() == "0::/some/path\n"               # this process stayed where it was


def test_v2_without_memory_peak_samples_memory_current(tmp_path, monkeypatch):
    k = FakeKernel(tmp_path, monkeypatch, peak=False)
    run = cgroup.run_limited([sys.executable, "-c", CHILD, str(k.own.parent), "current"], 300 << 20, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (run.peak_bytes, run.oom_kills) == (7777777, 2)


def test_v2_moves_this_process_to_a_leaf_when_only_its_cgroup_is_delegated(tmp_path, monkeypatch):
    """The parent is not writable: this process leaves its cgroup for a leaf, then memory is enabled there
    (in that order: the fake kernel refuses controllers for a cgroup that holds a process)."""
    k = FakeKernel(tmp_path, monkeypatch)
    only_own_writable(monkeypatch, k)
    ctrl = cgroup.memory_controller()
    assert (ctrl.kind, ctrl.path, ctrl.vacate) == ("cgroup-v2", k.own, True), ctrl
    ready = cgroup.prepare(ctrl)
    assert ready.kind == "cgroup-v2" and ready.path == k.own and "moved to" in ready.reason
    assert (k.own / "edgemoe-driver" / "cgroup.procs").read_text().split() == [str(os.getpid())]
    assert FakeKernel.words(k.own / "cgroup.subtree_control") == {"memory"}
    assert k.proc_cgroup.read_text() == "0::/some/path/edgemoe-driver\n"
    # asked again (this process now in the leaf): the runs still go below its old cgroup, nothing to do
    again = cgroup.memory_controller()
    assert (again.kind, again.path, again.vacate, again.enable) == ("cgroup-v2", k.own, False, ())
    run = cgroup.run_limited([sys.executable, "-c", CHILD, str(k.own), "peak"], 200 << 20, timeout=60)
    assert run.returncode == 0 and json.loads(run.stdout)["memory.max"] == str(200 << 20), run.stderr


def test_v2_enables_memory_down_the_chain_where_permitted(tmp_path, monkeypatch):
    """Memory available at the root but handed on nowhere: +memory in / and /some, runs in /some."""
    k = FakeKernel(tmp_path, monkeypatch, enabled=())
    ctrl = cgroup.memory_controller()
    assert ctrl.kind == "cgroup-v2" and ctrl.enable == (k.mount, k.mount / "some") and not ctrl.vacate
    assert cgroup.prepare(ctrl).kind == "cgroup-v2"
    for p in (k.mount, k.mount / "some"):
        assert "memory" in FakeKernel.words(p / "cgroup.subtree_control"), p
    run = cgroup.run_limited([sys.executable, "-c", CHILD, str(k.mount / "some"), "peak"], 100 << 20, timeout=60)
    assert run.returncode == 0, run.stderr


def test_v2_other_processes_in_a_cgroup_only_it_may_write_are_a_reason(tmp_path, monkeypatch):
    k = FakeKernel(tmp_path, monkeypatch, others=(OTHER_PID,))
    only_own_writable(monkeypatch, k)
    ctrl = cgroup.memory_controller()
    assert ctrl.kind == "none" and ctrl.path is None
    assert "no-internal-processes rule" in ctrl.reason and str(OTHER_PID) in ctrl.reason
    assert cgroup.own_memory_cgroup() is None
    with pytest.raises(RuntimeError, match="no-internal-processes"):
        cgroup.run_limited([sys.executable, "-c", "pass"], 100 << 20)


def test_v2_without_the_memory_controller_is_a_reason(tmp_path, monkeypatch):
    """Like this host's /sys/fs/cgroup/unified: memory is bound to v1, so v2 does not offer it."""
    FakeKernel(tmp_path, monkeypatch, root_controllers="hugetlb", enabled=())
    ctrl = cgroup.memory_controller()
    assert ctrl.kind == "none" and "memory is not one of its controllers (cgroup.controllers: hugetlb)" in ctrl.reason


def test_v2_not_delegated_is_a_reason(tmp_path, monkeypatch):
    FakeKernel(tmp_path, monkeypatch)
    monkeypatch.setattr(cgroup, "_writable", lambda path: False)      # as a user nothing is delegated to
    ctrl = cgroup.memory_controller()
    assert ctrl.kind == "none" and "writable by this user (not delegated)" in ctrl.reason
    (tmp_path / "b").mkdir()
    FakeKernel(tmp_path / "b", monkeypatch, enabled=())
    ctrl = cgroup.memory_controller()
    assert ctrl.kind == "none" and "memory is not enabled in" in ctrl.reason and "not delegated" in ctrl.reason


def test_v2_a_refused_move_is_a_reason_and_changes_nothing(tmp_path, monkeypatch):
    """The kernel refuses to enable memory (another process arrived after the check): reported, moved back."""
    k = FakeKernel(tmp_path, monkeypatch)
    only_own_writable(monkeypatch, k)
    ctrl = cgroup.memory_controller()
    (k.own / "cgroup.procs").write_text(f"{OTHER_PID}\n")
    ready = cgroup.prepare(ctrl)
    assert ready.kind == "none" and "enabling memory in" in ready.reason and "no-internal-processes" in ready.reason
    assert str(os.getpid()) in (k.own / "cgroup.procs").read_text().split()
    assert k.proc_cgroup.read_text() == "0::/some/path\n"


def test_v2_memory_limit_is_the_smallest_on_the_path(tmp_path, monkeypatch):
    k = FakeKernel(tmp_path, monkeypatch)
    assert limits.memory_limit() is None                            # "max" everywhere
    (k.mount / "some" / "memory.max").write_text("1073741824\n")   # a parent's limit holds for its children
    assert limits.memory_limit() == 1 << 30
    (k.own / "memory.max").write_text(f"{3 << 30}\n")
    assert limits.memory_limit() == 1 << 30


def test_v2_limit_below_the_dense_weights_is_refused_up_front(tmp_path, monkeypatch, fixture_path):
    """edgemoe_llamacpp.Llama reads the v2 limit (the fake tree's memory.max) before llama.cpp loads."""
    from edgemoe_llamacpp.engine.llama import Llama

    k = FakeKernel(tmp_path, monkeypatch)
    (k.own / "memory.max").write_text(f"{read_layout(fixture_path).dense_bytes // 2}\n")
    with pytest.raises(BudgetError, match="its cgroup's memory limit.*dense weights"):
        Llama(str(fixture_path), memory_budget="50%", verbose=False)


REAL = cgroup.memory_controller()


def test_this_host_says_which_controller_or_why_none():
    assert REAL.kind in ("cgroup-v1", "cgroup-v2", "none") and REAL.reason
    assert (REAL.path is None) == (REAL.kind == "none")
    print(f"this host: {REAL.kind}: {REAL.reason}")


@pytest.mark.skipif(REAL.kind == "none", reason=REAL.reason)
def test_real_controller_counts_peak_and_oom_kill():
    """For real: a child that allocates past a 64 MiB limit is OOM-killed, and the kill is counted."""
    grow = "b = []\nwhile True:\n    b.append(bytearray(8 << 20))\n"
    run = cgroup.run_limited([sys.executable, "-c", grow], 64 << 20, timeout=120)
    assert run.kind == REAL.kind
    assert run.returncode == -9 and run.oom_kills >= 1, run
    assert 0 < run.peak_bytes <= 64 << 20
    ok = cgroup.run_limited([sys.executable, "-c", "b = bytearray(16 << 20)"], 64 << 20, timeout=120)
    assert ok.returncode == 0 and ok.oom_kills == 0 and 16 << 20 < ok.peak_bytes <= 64 << 20


@pytest.mark.skipif(cgroup.memory_controller().kind == "none", reason="no writable memory controller here")
def test_a_limited_run_dies_with_the_process_that_started_it(tmp_path):
    """An interrupted bench must not leave its run behind: kill the parent, the child goes too."""
    import signal
    import subprocess
    import time

    marker = tmp_path / "child.pid"
    child = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = ("import sys; from edgemoe_bench import cgroup; "
              f"cgroup.run_limited([sys.executable, '-c', {child!r}], 256 << 20)")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        for _ in range(200):
            if marker.exists() and marker.read_text():
                break
            time.sleep(0.05)
        pid = int(marker.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the limited run outlived the process that started it")
    finally:
        proc.kill()
