"""Importance matrices per expert (imatrix.py) against hand computations, and ggml's quantizer taking them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgemoe_llamacpp.convert.imatrix import from_profile, mean_squares
from edgemoe_llamacpp.convert.profile import Profile
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.layout import read_layout


def test_mean_squares_by_hand():
    samples = np.array([[[1, 2], [3, -4], [9, 9]],           # expert 0: two samples filled, the third is stale
                        [[5, 5], [6, 6], [7, 7]],            # expert 1: none filled
                        [[0.5, -1], [1.5, 0], [-2.5, 3]]],   # expert 2: all three
                       dtype=np.float16)
    got = mean_squares(samples, np.array([2, 0, 3]))
    want = np.array([[(1 + 9) / 2, (4 + 16) / 2],
                     [1, 1],                                 # no evidence: every column alike
                     [(0.25 + 2.25 + 6.25) / 3, (1 + 0 + 9) / 3]], dtype=np.float32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


def write_profile(path, layout, inputs, down_inputs, counts) -> None:
    n_l = len(layout.moe_layers)
    meta = {"format": ["edgemoe-profile", 2], "moe_layers": list(layout.moe_layers), "n_expert": layout.n_expert}
    ids = np.zeros((4, n_l, layout.n_expert_used), np.int16)
    with open(path, "wb") as f:
        np.savez(f, meta=json.dumps(meta), ids=ids, weights=np.full(ids.shape, 0.5, np.float32), inputs=inputs,
                 input_weights=np.zeros(inputs.shape[:3], np.float32), input_count=counts, down_inputs=down_inputs)


def test_from_profile_gives_each_tensor_its_own_inputs(fixture_path, tmp_path):
    """gate and up from the FFN inputs, down from the down projection's inputs, each expert from its own samples."""
    layout = read_layout(fixture_path)
    n_l, n_e, s = len(layout.moe_layers), layout.n_expert, 3
    rng = np.random.default_rng(0)
    inputs = rng.normal(0, 1, (n_l, n_e, s, 256)).astype(np.float16)
    down = rng.normal(0, 2, (n_l, n_e, s, 256)).astype(np.float16)
    counts = rng.integers(0, s + 1, (n_l, n_e)).astype(np.int32)
    counts[2, 5] = 0
    write_profile(tmp_path / "p.npz", layout, inputs, down, counts)
    imatrix = from_profile(Profile(tmp_path / "p.npz", layout), layout)
    assert set(imatrix) == {t.name for t in layout.expert_tensors}
    for name, layer, e, col in (("ffn_gate_exps", 3, 7, 11), ("ffn_up_exps", 3, 7, 11), ("ffn_down_exps", 3, 7, 11),
                                ("ffn_down_exps", 0, 15, 255), ("ffn_up_exps", 2, 5, 0)):
        n = int(counts[layer, e])
        src = down if name == "ffn_down_exps" else inputs
        want = sum(float(src[layer, e, i, col]) ** 2 for i in range(n)) / n if n else 1.0
        got = imatrix[f"blk.{layer}.{name}.weight"][e, col]
        assert got == pytest.approx(want, rel=1e-6), (name, layer, e, col)


def test_an_older_profile_is_refused_by_name(fixture_path, tmp_path):
    layout = read_layout(fixture_path)
    with open(tmp_path / "v1.npz", "wb") as f:
        np.savez(f, meta=json.dumps({"format": ["edgemoe-profile", 1], "moe_layers": list(layout.moe_layers),
                                     "n_expert": 16}))
    with pytest.raises(EdgeMoEError, match="format 1, from an older edgemoe"):
        Profile(tmp_path / "v1.npz")


@pytest.mark.runtime
@pytest.mark.parametrize("type_name", [t for t in quant.PLAN_TYPES if t != "Q8_0"])
def test_ggml_weights_the_rounding_error_by_the_imatrix(type_name):
    """With an importance matrix that favours a few columns, those columns come out closer; and the error
    weighted by the matrix falls (what ggml's quantizers minimise with one)."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (16, 256)).astype(np.float32)
    imatrix = np.full(256, 0.01, np.float32)
    imatrix[rng.choice(256, 24, replace=False)] = 10.0
    with_imatrix = quant.dequantize(quant.quantize(w, type_name, imatrix), type_name, 256)
    other = rng.permutation(imatrix)               # favours other columns
    without = quant.dequantize(quant.quantize(w, type_name, other), type_name, 256)
    err = ((with_imatrix - w) ** 2 * imatrix).sum()
    assert err < 0.5 * ((without - w) ** 2 * imatrix).sum()


@pytest.mark.runtime
def test_imatrix_checks():
    w = np.ones((2, 256), np.float32)
    with pytest.raises(EdgeMoEError, match="IQ2_XXS needs an importance matrix"):
        quant.quantize(w, "IQ2_XXS")               # ggml would abort the process instead
    for bad in (np.ones(255), np.full(256, np.nan), -np.ones(256)):
        with pytest.raises(EdgeMoEError, match="finite, non-negative"):
            quant.quantize(w, "Q4_K", bad)
    assert quant.requires_imatrix("IQ2_XS") and not quant.requires_imatrix("IQ2_S")
    # Q8_0 takes none: the same bytes with or without
    w = np.random.default_rng(2).normal(0, 1, (2, 256)).astype(np.float32)
    assert quant.quantize(w, "Q8_0", np.arange(256.0)) == quant.quantize(w, "Q8_0")


def test_plan_types_and_sizes():
    """The i-quants among the plan's types, smallest first, with their sizes from gguf-py's table."""
    bits = [quant.bits_per_weight(t) for t in quant.PLAN_TYPES]
    assert bits == sorted(bits)
    assert {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"} <= set(quant.PLAN_TYPES)
    assert quant.bits_per_weight("IQ2_XXS") == 2.0625 and quant.bits_per_weight("IQ4_XS") == 4.25
    assert quant.row_bytes("IQ3_S", 512) == 2 * 110
    assert not quant.fits("IQ4_XS", 384)           # blocks of 256 values, as the K-quants
