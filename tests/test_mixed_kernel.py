"""The patched mul_mat_id on a tensor whose experts have different types, against a numpy reference.

Every stacked expert tensor of the file below holds experts at all twelve plan types, the i-quants among the
K-quants and Q8_0 (expert e of layer L at PLAN_TYPES[(e + L) % 12]), so every pair of types shares a tensor.
The file is quantized with (random) importance matrices, without which ggml cannot make IQ2_XXS and IQ2_XS.
For each MUL_MAT_ID node of the graph (`ffn_moe_gate/up/down-N`) the test reads the node's own inputs (src1,
the chosen ids) and output, and recomputes every (token, slot) with gguf-py's dequantization of the expert's
bytes at its own type, times the input quantized to the type's vec_dot_type as ggml-cpu reports it.
"""
from __future__ import annotations

import ctypes
import functools

import gguf
import llama_cpp
import numpy as np
import pytest

from edgemoe_llamacpp import pages, runtime
from edgemoe_llamacpp.convert.rewrite import convert
from edgemoe_llamacpp.engine.llama import _types, llama_params
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.layout import read_layout

pytestmark = pytest.mark.skipif(not runtime.patched(), reason="needs llama-cpp-python built with patches/")

MUL_MAT_ID = 30
NODES = (b"ffn_moe_gate-", b"ffn_moe_up-", b"ffn_moe_down-")


@pytest.fixture(scope="module")
def mixed_file(fixture_path, tmp_path_factory):
    layout = read_layout(fixture_path)
    n = len(quant.PLAN_TYPES)
    assert layout.n_expert >= n
    plan = {t.name: [quant.PLAN_TYPES[(e + t.layer) % n] for e in range(t.count)] for t in layout.expert_tensors}
    rng = np.random.default_rng(18)
    imatrix = {t.name: rng.uniform(0.1, 2.0, (t.count, 256)).astype(np.float32) for t in layout.expert_tensors}
    out = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    return convert(fixture_path, out, plan, progress=False, imatrix=imatrix)


@functools.cache
def vec_dot_type(type_name: str) -> str:
    """The type ggml-cpu converts src1 to for a weight of `type_name` (ggml_get_type_traits_cpu: from_float,
    vec_dot, then enum ggml_type vec_dot_type)."""
    lib = ctypes.CDLL(runtime.loaded_library("libggml-cpu"))
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits_cpu.restype = ctypes.c_void_p
    traits = lib.ggml_get_type_traits_cpu(int(quant.qtype(type_name)))
    return quant.qtype(ctypes.c_int32.from_address(traits + 2 * ctypes.sizeof(ctypes.c_void_p)).value).name


def read_f32(t: int) -> np.ndarray:
    """Any F32 tensor as a float64 array indexed [i3, i2, i1, i0], honouring its strides."""
    ne = list((ctypes.c_int64 * 4).from_address(t + runtime.T_NE))
    nb = list((ctypes.c_size_t * 4).from_address(t + runtime.T_NB))
    assert ctypes.c_int32.from_address(t + runtime.T_TYPE).value == 0          # GGML_TYPE_F32
    data = ctypes.c_void_p.from_address(t + runtime.T_DATA).value
    span = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + 4
    flat = np.frombuffer((ctypes.c_char * span).from_address(data), dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(flat.view(np.float32), ne[::-1], nb[::-1]).astype(np.float64)


class Capture:
    def __init__(self):
        self.nodes: list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]] = []
        self.error = None

    def cb(self, t, ask, _user):
        name = ctypes.string_at(t + runtime.T_NAME, 24).split(b"\0", 1)[0]
        _, _, layer = name.rpartition(b"-")
        if not (name.startswith(NODES) and layer.isdigit()):
            return False
        if ask:
            return True
        try:
            assert ctypes.c_int32.from_address(t + runtime.T_OP).value == MUL_MAT_ID
            src = (ctypes.c_void_p * 3).from_address(t + runtime.T_SRC)
            weights, x, ids = src[0], src[1], src[2]
            ne_ids = list((ctypes.c_int64 * 2).from_address(ids + runtime.T_NE))
            nb_ids = list((ctypes.c_size_t * 2).from_address(ids + runtime.T_NB))
            ids_ptr = ctypes.c_void_p.from_address(ids + runtime.T_DATA).value
            raw = np.frombuffer((ctypes.c_char * ((ne_ids[1] - 1) * nb_ids[1] + ne_ids[0] * 4))
                                .from_address(ids_ptr), dtype=np.int32)
            chosen = np.lib.stride_tricks.as_strided(raw, (ne_ids[1], ne_ids[0]), nb_ids[::-1]).copy()
            w_name = ctypes.string_at(weights + runtime.T_NAME).decode()
            self.nodes.append((w_name, ctypes.c_void_p.from_address(weights + runtime.T_DATA).value,
                               read_f32(x)[0], chosen, read_f32(t)[0]))
        except BaseException as e:  # noqa: BLE001 -- must not unwind through C; re-raised after the eval
            self.error = self.error or e
        return True


def run(path, layout, prompt_tokens: int):
    cap = Capture()
    cb = llama_cpp.llama_cpp.ggml_backend_sched_eval_callback(cap.cb)
    with llama_params(use_extra_bufts=False, cb_eval=cb):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, verbose=False)
    owner = object()
    try:
        start, _, offset, _ = pages.file_mappings(path)[0]
        base = start - offset
        _types.add(owner, layout, [base])
        tokens = llm.tokenize(b"import os\nimport sys\n\ndef main(argv):\n    return argv[0]\n" * 8)
        llm.eval(tokens[:prompt_tokens])
        batch = list(cap.nodes)
        cap.nodes.clear()
        llm.eval(tokens[prompt_tokens:prompt_tokens + 1])
        if cap.error:
            raise cap.error
        return base, batch, list(cap.nodes)
    finally:
        _types.remove(owner)
        llm.close()


def as_vec_dot_input(x: np.ndarray, type_name: str) -> np.ndarray:
    """x as the kernel sees it: quantized to the weight type's vec_dot_type (Q8_0, or Q8_K for K- and i-quants)."""
    vdt = vec_dot_type(type_name)
    assert vdt in ("Q8_0", "Q8_K"), (type_name, vdt)
    if vdt == "Q8_0":
        return quant.dequantize(gguf.quants.quantize(x[None].astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                                "Q8_0", x.size)[0].astype(np.float64)
    # Q8_K (ggml-quants.c quantize_row_q8_K_ref): per 256 values, scale -127/max by the signed extreme
    blocks = x.astype(np.float32).reshape(-1, 256)
    extreme = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    iscale = np.where(extreme != 0, np.float32(-127.0) / np.where(extreme != 0, extreme, 1), 0).astype(np.float32)
    q = np.minimum(127, np.rint(blocks * iscale[:, None]))
    d = np.where(iscale != 0, 1 / np.where(iscale != 0, iscale, 1), 0)
    return (q * d[:, None]).reshape(-1).astype(np.float64)


def reference(layout, base, node, wrong_type: bool = False):
    """Expected output [T, k, n_out] of one MUL_MAT_ID node from the file's bytes, and the types used."""
    w_name, w_ptr, x, ids, _ = node
    tensor = next(t for t in layout.expert_tensors if t.name == w_name)
    assert w_ptr == base + tensor.offset
    data = np.memmap(layout.path, dtype=np.uint8, mode="r")
    n_tok, k = ids.shape
    out, used = [], set()
    for tok in range(n_tok):
        row = []
        for j in range(k):
            r = tensor.slice(int(ids[tok, j]))
            tn = tensor.type if wrong_type else r.type
            nbytes = r.size if not wrong_type else tensor.stride
            w = quant.dequantize(np.array(data[r.offset:r.offset + nbytes]), tn, x.shape[-1])
            xi = as_vec_dot_input(x[tok, j % x.shape[1]], tn)
            row.append(w.astype(np.float64) @ xi)
            used.add(r.type)
        out.append(row)
    return np.array(out), used


@pytest.mark.parametrize("prompt_tokens", [1, 48])
def test_mixed_mul_mat_id_matches_numpy(mixed_file, prompt_tokens):
    base, batch, single = run(mixed_file.path, mixed_file, prompt_tokens)
    assert len(batch) == len(single) == 3 * len(mixed_file.moe_layers)
    types_seen = set()
    for nodes, n_tok in ((batch, prompt_tokens), (single, 1)):
        for i, node in enumerate(nodes):
            got = node[4]
            # the last layer runs its FFN only on the tokens whose logits are wanted: the last one
            assert got.shape[0] == (n_tok if i < len(nodes) - 3 else 1)
            want, used = reference(mixed_file, base, node)
            types_seen |= used
            # float32 accumulation against a float64 reference of the same quantized operands
            err = np.abs(got - want).max()
            assert err <= 1e-5 * np.abs(want).max(), (node[0], err)
    # a prompt of 48 tokens reaches experts of every type (one token alone need not)
    assert types_seen == set(quant.PLAN_TYPES) if prompt_tokens > 1 else types_seen <= set(quant.PLAN_TYPES)


def test_reference_tells_types_apart(mixed_file):
    """The comparison above fails if the kernel read every expert at the tensor's declared type."""
    base, batch, _ = run(mixed_file.path, mixed_file, 48)
    node = batch[0]
    want, _ = reference(mixed_file, base, node)
    with np.errstate(invalid="ignore", over="ignore"):      # other types' bytes read as Q8_0 scales
        wrong, _ = reference(mixed_file, base, node, wrong_type=True)
    assert np.abs(node[4] - want).max() <= 1e-5 * np.abs(want).max()
    assert not np.all(np.abs(wrong - want) <= 1e-5 * np.abs(want).max())
