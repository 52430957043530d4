"""The CLI contract (tests/cli_contract.py) on every CI run: 50 generated cases per subcommand, each in a
forked child: exit 0 or 2, no signal, no hang, no traceback, no pre-existing file changed unless --force
names it. The runner is its own process, so no model this test session loaded shares its fork."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
RUNNER = Path(__file__).parent / "cli_contract.py"
EXAMPLES = int(os.environ.get("EDGEMOE_CLI_CONTRACT_EXAMPLES", "50"))


@pytest.mark.parametrize("commands", [("inspect", "verify", "convert"), ("run", "serve"), ("ppl", "profile"),
                                      ("bench",)], ids=lambda c: "+".join(c))
def test_cli_contract(commands, tmp_path):
    proc = subprocess.run([sys.executable, str(RUNNER), "--examples", str(EXAMPLES), "--commands", *commands],
                          capture_output=True, text=True, timeout=1500, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    for command in commands:
        assert f"{command}: " in proc.stderr, proc.stderr[-2000:]
