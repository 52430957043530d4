"""Ctrl-C: every command stops within two seconds of SIGINT, exits 130, prints no traceback, writes no output
and never reports success, wherever the signal lands (loading, prefill, decoding under a budget, profiling,
planning, a benchmark's child runs).

Each case runs `edgemoe` in a child process in a session of its own and signals it as a terminal's Ctrl-C does
(the whole process group), or the command's process alone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgemoe_llamacpp.errors import EXIT_INTERRUPTED

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
STOP_WITHIN_S = 2.0


def default_sigint() -> None:
    """In the child before exec: SIGINT as a terminal leaves it (a CI runner may start jobs with it ignored, and
    Python then keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(argv: list[str], after_s: float, *, group: bool = True, cwd: Path | None = None,
              sig: int = signal.SIGINT, until=None) -> dict:
    """Start `edgemoe argv`, send it `sig` (SIGINT) `after_s` seconds later, or once `until()` is true if given;
    its exit code, output, how long it took to stop and the processes it had started that outlived it."""
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe_llamacpp", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=cwd,
                            preexec_fn=default_sigint)  # noqa: PLW1509 - one signal() call
    try:
        deadline = time.monotonic() + 60
        while until is not None and not until() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(after_s)
        assert proc.poll() is None, f"edgemoe {argv[0]} ended before the signal: {proc.communicate()}"
        children = psutil.Process(proc.pid).children(recursive=True)
        sent = time.perf_counter()
        (os.killpg if group else os.kill)(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
        took = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.2)
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    return {"code": proc.returncode, "out": out, "err": err, "took": took, "left": left}


def assert_stopped(r: dict, *outputs: Path) -> None:
    assert r["code"] == EXIT_INTERRUPTED, (r["code"], r["err"][-3000:])
    assert r["took"] <= STOP_WITHIN_S, f"took {r['took']:.2f} s to stop"
    assert "Traceback" not in r["err"] and "KeyboardInterrupt" not in r["err"], r["err"][-3000:]
    assert not r["left"], f"left running: {r['left']}"
    for path in outputs:
        assert not path.exists(), f"{path} was written"
        assert not list(path.parent.glob(f".{path.name}.*")), "a temporary was left"


@pytest.mark.parametrize("predictor", ["none", "gate"])
@pytest.mark.parametrize("after_s", [1.5, 4.0, 7.0])
def test_sigint_stops_a_run_under_a_budget(fixture_path, predictor, after_s):
    r = interrupt(["run", str(fixture_path), "-p", PROMPT, "-n", "100000", "--n-ctx", "4096",
                   "--memory-budget", "25%", "--predictor", predictor], after_s)
    assert_stopped(r)
    assert "--- edgemoe" not in r["out"]              # no summary: the run did not finish


@pytest.mark.parametrize("after_s", [2.0, 5.0])
def test_sigint_stops_ppl(fixture_path, after_s):
    r = interrupt(["ppl", str(fixture_path), "--tokens", "400000", "--n-ctx", "256", "--memory-budget", "50%"],
                  after_s)
    assert_stopped(r)
    assert "perplexity" not in r["out"]


@pytest.mark.parametrize("after_s", [2.0, 5.0])
def test_sigint_stops_profile_and_writes_nothing(fixture_path, tmp_path, after_s):
    out = tmp_path / "p.npz"
    r = interrupt(["profile", str(fixture_path), "--out", str(out), "--tokens", "400000", "--n-ctx", "256"], after_s)
    assert_stopped(r, out)


@pytest.fixture(scope="module")
def profile_path(fixture_path, tmp_path_factory) -> Path:
    from edgemoe_llamacpp.convert.record import profile

    path = tmp_path_factory.mktemp("prof") / "p.npz"
    profile(str(fixture_path), path, tokens=2048, n_ctx=256, samples=256, progress=False)
    return path


@pytest.mark.parametrize("after_s", [2.5, 5.0])
def test_sigint_stops_planning_a_conversion(fixture_path, profile_path, tmp_path, after_s):
    out = tmp_path / "out.gguf"
    r = interrupt(["convert", str(fixture_path), str(out), "--profile", str(profile_path), "--expert-bits", "3",
                   "--save-plan", str(tmp_path / "plan.json")], after_s)
    assert_stopped(r, out, tmp_path / "plan.json")
    assert "measure expert costs" in r["err"]          # it was planning when the signal came


def test_sigint_leaves_an_existing_output_as_it_was(fixture_path, profile_path, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the old file")
    r = interrupt(["convert", str(fixture_path), str(out), "--profile", str(profile_path), "--expert-bits", "3",
                   "--force"], 3.0)
    assert r["code"] == EXIT_INTERRUPTED and out.read_bytes() == b"the old file"


@pytest.mark.parametrize("group", [True, False], ids=["ctrl-c", "parent-only"])
@pytest.mark.parametrize("after_s", [3.0, 8.0])
def test_sigint_stops_a_bench_and_its_child_runs(fixture_path, tmp_path, group, after_s):
    out = tmp_path / "bench.json"
    r = interrupt(["bench", str(fixture_path), "--memory-budget", "50%", "--runs", "20", "--tokens", "128",
                   "--json", str(out)], after_s, group=group)
    assert_stopped(r, out)


def test_sigterm_stops_a_conversion_as_ctrl_c_does_and_leaves_no_temporary(fixture_path, tmp_path):
    """SIGTERM (kill, timeout, a service manager) while convert writes its output: the temporary (as large as the
    model, for a real one) is removed, the output that was there is kept, no traceback, exit 128 + SIGTERM."""
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the old file")
    r = interrupt(["convert", str(fixture_path), str(out), "--uniform", "IQ4_XS", "--force"], 0, sig=signal.SIGTERM,
                  until=lambda: list(tmp_path.glob(".out.gguf.*")))
    assert r["code"] == 128 + signal.SIGTERM, (r["code"], r["err"][-3000:])
    assert r["took"] <= STOP_WITHIN_S, f"took {r['took']:.2f} s to stop"
    assert "Traceback" not in r["err"], r["err"][-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"] and out.read_bytes() == b"the old file"


def test_sigterm_stops_a_run_under_a_budget(fixture_path):
    r = interrupt(["run", str(fixture_path), "-p", PROMPT, "-n", "100000", "--n-ctx", "4096", "--memory-budget",
                   "25%"], 3.0, sig=signal.SIGTERM)
    assert r["code"] == 128 + signal.SIGTERM, (r["code"], r["err"][-3000:])
    assert r["took"] <= STOP_WITHIN_S and "Traceback" not in r["err"] and not r["left"]
