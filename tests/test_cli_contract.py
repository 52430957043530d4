"""The CLI contract (tests/cli_contract.py) on every CI run: 50 generated cases per subcommand, each in a
forked child: exit 0 or 2, no signal, no hang, no traceback, no pre-existing file changed unless --force
names it, and an output that is a FIFO, a device or a socket refused (exit 2) and left as it was. The runners
are processes of their own, so no model this test session loaded shares their forks; two run at once, one per
core."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
RUNNER = Path(__file__).parent / "cli_contract.py"
EXAMPLES = int(os.environ.get("EDGEMOE_CLI_CONTRACT_EXAMPLES", "50"))
GROUPS = (("inspect", "verify", "convert", "run"), ("serve", "ppl", "profile", "bench"))


def test_cli_contract(tmp_path):
    procs = []
    for i, commands in enumerate(GROUPS):
        log = open(tmp_path / f"runner{i}.log", "w")  # noqa: SIM115 - a file, closed below: a pipe could stall it
        procs.append((commands, log, subprocess.Popen(
            [sys.executable, str(RUNNER), "--examples", str(EXAMPLES), "--commands", *commands],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)))
    failures = []
    for i, (commands, log, proc) in enumerate(procs):
        try:
            code = proc.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        out = (tmp_path / f"runner{i}.log").read_text()
        if code != 0 or not all(f"{c}: " in out for c in commands):
            failures.append(f"{'+'.join(commands)}: exit {code}\n{out[-6000:]}")
    assert not failures, "\n\n".join(failures)
