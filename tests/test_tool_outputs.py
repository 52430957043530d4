"""The scripts in tools/ check every file they write as `edgemoe` does (files.tool_output): a FIFO, device or
socket given as an output is refused in one line with exit 2 before any work, and left as it was."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# each tool's output flag, at {out}; its inputs name a file that does not exist ({missing}): the output is
# checked before any input is read (the old code failed on the input, or wrote through the node)
TOOLS = {
    "bench_baseline": ["{missing}", "--baseline", "HEAD", "--out", "{out}"],
    "bench_configs": ["{missing}", "--out", "{out}"],
    "bench_report": ["{missing}.json", "--out", "{out}"],
    "chat_turns": ["{missing}", "--json", "{out}"],
    "fetch_microbench": ["{missing}", "--json", "{out}"],
    "hook_overhead": ["{missing}", "--json", "{out}"],
    "inflate_experts": ["{missing}", "{out}", "--ff", "512", "--force"],
    "make_tiny_moe": ["--out", "{out}", "--n-embd", "100"],
    "make_trace": ["--stats", "--stats-json", "{out}", "--tokens", "64", "--seeds", "1"],
    "policy_replay": ["{missing}", "--json", "{out}"],
    "predictor_recall": ["{missing}", "--json", "{out}"],
    "prefill_bench": ["{missing}", "--prompt-tokens", "512", "--json", "{out}"],
    "prefetch_sweep": ["{missing}", "--out", "{out}"],
    "routing_fixture": ["{missing}", "--json", "{out}"],
    "quality_fixture": ["{missing}", "--work", "{tmp}/work", "--out", "{out}"],
    "quality_sweep": ["--model", "{missing}", "--work", "{tmp}/work", "--out", "{out}"],
    "server_load": ["--base-url", "http://127.0.0.1:9", "--json", "{out}"],
    "substitution_sweep": ["--reference", "{missing}", "--work", "{tmp}/work", "--out", "{out}"],
}


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_refuse_outputs_that_are_not_regular_files(tool, tmp_path):
    out = tmp_path / "out.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(out))
    argv = [a.format(out=out, missing=tmp_path / "missing.gguf", tmp=tmp_path) for a in TOOLS[tool]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *argv], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    what = "dst" if tool == "inflate_experts" else argv[argv.index(str(out)) - 1]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip() == (f"{tool}.py: error: {what} {out} is a socket, not a regular file; edgemoe writes "
                                   f"regular files only and never replaces this, even with --force"), proc.stderr[-2000:]
    assert Path(out).is_socket()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.sock"]          # nothing made: no work started
