"""tools/inflate_experts.py: wider experts, same routing and output."""
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgemoe_llamacpp.engine.generate import greedy
from edgemoe_llamacpp.engine.llama import stock_llama
from edgemoe_llamacpp.gguf.layout import read_layout

TOOL = Path(__file__).parent.parent / "tools" / "inflate_experts.py"


def logits_after(path, prompt: str = "import os\nimport sys\n\n\ndef ", n: int = 24):
    llm = stock_llama(path, use_extra_bufts=False, n_ctx=128, verbose=False)
    try:
        return greedy(llm, prompt, n)
    finally:
        llm.close()


def test_inflated_experts_keep_output(tmp_path, fixture_path):
    out = tmp_path / "wide.gguf"
    subprocess.run([sys.executable, str(TOOL), str(fixture_path), str(out), "--ff", "768"], check=True,
                   capture_output=True)
    small, wide = read_layout(fixture_path), read_layout(out)
    assert wide.n_expert == small.n_expert and len(wide.experts) == len(small.experts)
    assert wide.experts[0].nbytes == 3 * small.experts[0].nbytes      # 256 -> 768 hidden units
    assert wide.dense_bytes == small.dense_bytes
    toks_a, logits_a = logits_after(fixture_path)
    toks_b, logits_b = logits_after(out)
    assert len(set(toks_a)) > 5 and np.ptp(logits_a[-1]) > 1       # real text, real logits
    assert toks_a == toks_b
    np.testing.assert_allclose(logits_a, logits_b, rtol=0, atol=1e-4)
