"""tools/make_tiny_moe.py: a configured model written at F16 (the quality fixture's form), its quantization probe,
and a finished checkpoint exported again to the same tensors; the bundled fixture's path is refused for other
options. Trains a 1-layer model for 3 steps on the stdlib corpus (the tokenizer and encoding take most of it)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_tiny_moe.py"
SMALL = ["--steps", "3", "--warmup", "1", "--n-layer", "1", "--n-expert", "4", "--seq-len", "128", "--batch-size", "2",
         "--eval-tokens", "2048"]


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=cwd,
                          check=False)


def tensors(path: Path) -> dict:
    return {t.name: (t.tensor_type, np.array(t.data)) for t in GGUFReader(path).tensors}


def test_f16_model_probe_and_resumed_export(tmp_path):
    pytest.importorskip("torch", reason="training needs the train extra (make installs torch's CPU build)")
    out, ckpt, report = tmp_path / "m.gguf", tmp_path / "m.pt", tmp_path / "m.json"
    args = [*SMALL, "--dtype", "F16", "--probe", "Q2_K", "--probe-tokens", "2048", "--checkpoint", str(ckpt),
            "--checkpoint-every", "2", "--out", str(out), "--report", str(report)]
    first = run(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    written = tensors(out)
    for name, (qt, _) in written.items():
        # matrices at F16; norms and the router at F32, as llama.cpp's qwen3moe reads them
        kept = name.endswith("norm.weight") or "ffn_gate_inp" in name
        assert qt == (GGMLQuantizationType.F32 if kept else GGMLQuantizationType.F16), name
    r = json.loads(report.read_text())
    assert r["dtype"] == "F16" and r["config"]["n_layer"] == 1 and r["train_seconds"] > 0
    (row,) = r["expert_quant_probe"]["rows"]
    assert row["step"] == 3 and row["Q2_K"] != row["ppl"] and np.isfinite(r["llama_cpp_val_ppl"])
    desc = json.loads(GGUFReader(out).fields["general.description"].contents())
    assert desc["config"]["n_layer"] == 1 and desc["steps"] == 3      # provenance: what differs from the default

    out.unlink()
    again = run(*args)                                   # the finished checkpoint: no step runs, the same model
    assert again.returncode == 0 and "resumed from" in again.stdout and "at step 3" in again.stdout
    for name, (qt, data) in tensors(out).items():
        assert qt == written[name][0] and np.array_equal(data, written[name][1]), name

    other = run(*SMALL, "--checkpoint", str(ckpt), "--n-expert", "8", "--out", str(tmp_path / "x.gguf"))
    assert other.returncode != 0 and "n_expert" in other.stderr      # a checkpoint of another configuration


def test_the_bundled_fixture_is_written_only_with_default_options(tmp_path):
    (tmp_path / "tests" / "fixtures").mkdir(parents=True)
    refused = run("--dtype", "F16", cwd=tmp_path)
    assert refused.returncode != 0 and "bundled runtime fixture" in refused.stderr
    assert not list((tmp_path / "tests" / "fixtures").iterdir())
