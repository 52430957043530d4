"""The rewriter, verifier, profiler and planner on the trained fixture, with the real llama.cpp."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import stock

from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.cli import main as cli
from edgemoe_llamacpp.convert.imatrix import from_profile
from edgemoe_llamacpp.convert.plan import choose, make_plan, measure_costs
from edgemoe_llamacpp.convert.profile import Profile
from edgemoe_llamacpp.convert.record import profile
from edgemoe_llamacpp.convert.rewrite import convert, uniform_plan
from edgemoe_llamacpp.convert.verify import verify
from edgemoe_llamacpp.engine.generate import greedy
from edgemoe_llamacpp.engine.llama import Llama
from edgemoe_llamacpp.errors import BadModelError, BudgetError, EdgeMoEError
from edgemoe_llamacpp.files import sha256_file
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.layout import read_layout

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
patched = pytest.mark.skipif(not runtime.patched(), reason="needs llama-cpp-python built with patches/")


@pytest.fixture(scope="module")
def mixed(fixture_path, tmp_path_factory):
    layout = read_layout(fixture_path)
    plan = {t.name: [("Q4_K", "Q6_K", "Q3_K", "Q8_0")[(e + t.layer) % 4] for e in range(t.count)]
            for t in layout.expert_tensors}
    return convert(fixture_path, tmp_path_factory.mktemp("conv") / "mixed.gguf", plan, progress=False)


@pytest.mark.stock
def test_uniform_file_loads_in_stock_llama_cpp(fixture_path, tmp_path):
    before = sha256_file(fixture_path)
    out = convert(fixture_path, tmp_path / "q4k.gguf", uniform_plan(read_layout(fixture_path), "Q4_K"),
                  progress=False)
    assert sha256_file(fixture_path) == before                  # the input is only read
    assert not out.mixed and {t.type for t in out.expert_tensors} == {"Q4_K"}
    assert out.expert_bytes == read_layout(fixture_path).expert_bytes * 144 // 272   # Q4_K vs Q8_0 rows
    assert all(r.offset % os.sysconf("SC_PAGE_SIZE") == 0 for t in out.expert_tensors for r in [t.slice(0)])
    assert verify(out.path)["checksums"] == "ok"
    tokens, logits = stock.greedy(out.path, PROMPT, 16, tmp_path / "logits.npy")    # plain llama-cpp-python
    assert len(set(tokens)) > 4 and np.isfinite(logits).all()


def test_mixed_file_layout_and_checks(mixed):
    assert mixed.mixed
    t = mixed.expert_tensors[0]
    assert t.type == "Q8_0"                     # declared at the largest type: slots of one Q8_0 expert
    assert [t.slice(e).type for e in range(4)] == [("Q4_K", "Q6_K", "Q3_K", "Q8_0")[(e + t.layer) % 4]
                                                  for e in range(4)]
    assert t.slice(0).size == 256 * 144 and t.slice(1).offset - t.slice(0).offset == t.stride
    report = verify(mixed.path)
    assert report["mixed"] and report["unaligned_expert_ranges"] == 0
    assert report["imatrix"] is False           # converted without importance matrices


def test_verify_finds_damage(mixed, tmp_path):
    bad = tmp_path / "bad.gguf"
    data = bytearray(Path(mixed.path).read_bytes())
    r = mixed.expert_tensors[3].slice(5)
    data[r.offset + 100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(BadModelError, match="fails its checksum"):
        verify(bad)


@patched
def test_mixed_file_runs_under_a_budget_with_the_hook(mixed):
    full = Llama(mixed.path, n_ctx=256, verbose=False)
    want = greedy(full, PROMPT, 32)
    full.close()
    llm = Llama(mixed.path, memory_budget="25%", n_ctx=256, verbose=False)
    got = greedy(llm, PROMPT, 32)
    total = llm.edgemoe_stats()["total"]
    llm.close()
    assert got[0] == want[0] and len(set(got[0])) > 4
    np.testing.assert_array_equal(got[1], want[1])
    assert total["misses"] > 0 and total["bytes_evicted"] > 0


def test_convert_refuses_to_overwrite_or_touch_its_input(fixture_path, mixed, tmp_path, capsys):
    before = os.stat(mixed.path).st_mtime_ns
    assert cli(["convert", str(fixture_path), mixed.path, "--uniform", "Q4_K"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert os.stat(mixed.path).st_mtime_ns == before
    assert cli(["convert", str(fixture_path), str(fixture_path), "--uniform", "Q4_K", "--force"]) == 2
    assert "never modifies its input" in capsys.readouterr().err
    assert cli(["convert", str(fixture_path), "/proc/edgemoe-out.gguf", "--uniform", "Q4_K"]) == 2
    assert "cannot write /proc/edgemoe-out.gguf" in capsys.readouterr().err
    assert cli(["convert", str(fixture_path), str(tmp_path / "x.gguf"), "--uniform", "Q9_Z"]) == 2
    assert "unknown ggml type" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_killed_conversion_leaves_input_and_output_path_clean(fixture_path, tmp_path):
    """SIGKILL while the header is written, and at 30% and 80% of the tensor data."""
    before = sha256_file(fixture_path)
    final_size = convert(fixture_path, tmp_path / "ref.gguf", uniform_plan(read_layout(fixture_path), "Q3_K"),
                         progress=False).file_size
    out = tmp_path / "out.gguf"
    cmd = [sys.executable, "-m", "edgemoe_llamacpp", "convert", str(fixture_path), str(out), "--uniform", "Q3_K"]
    for fraction in (0.0, 0.3, 0.8):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        landed = False
        while proc.poll() is None and not landed:
            partial = list(tmp_path.glob(".out.gguf.*.tmp"))
            landed = any(p.stat().st_size > fraction * final_size for p in partial if p.exists())
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert landed and proc.returncode == -signal.SIGKILL, fraction     # killed mid-write
        assert sha256_file(fixture_path) == before
        assert not out.exists()
    assert cli(cmd[3:]) == 0 and verify(out)["checksums"] == "ok"
    assert not list(tmp_path.glob(".out.gguf.*.tmp"))       # a later conversion clears dead ones' leftovers


@pytest.fixture(scope="module")
def prof(fixture_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "p.npz"
    profile(str(fixture_path), path, tokens=1024, n_ctx=256, samples=32, progress=False)
    return Profile(path)


def test_profile_records_the_routing_llama_cpp_ran(fixture_path, prof):
    n_tok = prof.meta["tokens"]
    assert prof.ids.shape == (n_tok, 8, 2) and n_tok == 1024
    np.testing.assert_allclose(prof.weights.sum(axis=2), 1, rtol=1e-5)
    assert (prof.weights[..., 0] >= prof.weights[..., 1] - 1e-6).all()     # router order: strongest first
    routed = np.stack([np.bincount(prof.ids[:, layer].ravel(), minlength=16) for layer in range(8)])
    np.testing.assert_array_equal(prof.input_count, np.minimum(routed, 32))   # every routed token sampled
    # the same window through edgemoe's hook chooses the same experts
    llm = Llama(str(fixture_path), n_ctx=256, n_batch=256, logits_all=True, record_routing=True, verbose=False)
    from edgemoe_llamacpp import corpus
    window = corpus.tokens(llm, corpus.split_texts("train"), 256)
    llm.eval(window)
    trace = llm.edgemoe_trace()
    llm.close()
    for layer, ids in trace:
        np.testing.assert_array_equal(np.array(ids), prof.ids[:256, layer])
    share = prof.expert_stats()["share"]
    np.testing.assert_allclose(share.sum(axis=1), 2)


def source_expert(path, name: str, expert: int) -> np.ndarray:
    """Expert `expert` of the stacked tensor `name` as float32 rows, from the file's bytes (gguf-py)."""
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    data = np.asarray(t.data).view(np.uint8).reshape(int(t.shape[-1]), -1)
    return quant.dequantize(data[expert], t.tensor_type.name, int(t.shape[0]))


def test_profile_records_what_down_multiplies(fixture_path, prof):
    """Each sampled token's down input is silu(x @ gate.T) * (x @ up.T) of its expert on its FFN input x."""
    n_checked = 0
    for layer, e in ((0, 3), (4, 9), (7, 15)):
        n = int(prof.input_count[layer, e])
        if not n:
            continue
        x = prof.inputs[layer, e, :n].astype(np.float64)
        gate, up = (source_expert(fixture_path, f"blk.{layer}.ffn_{k}_exps.weight", e) for k in ("gate", "up"))
        g, u = x @ gate.T, x @ up.T
        want = g / (1 + np.exp(-g)) * u
        got = prof.down_inputs[layer, e, :n].astype(np.float64)
        # llama.cpp rounds x to Q8_0 for the matmuls and the profile keeps float16
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max(), (layer, e)
        other = source_expert(fixture_path, f"blk.{layer}.ffn_up_exps.weight", (e + 1) % 16)
        assert np.abs(got - g / (1 + np.exp(-g)) * (x @ other.T)).max() > 0.2 * np.abs(want).max()
        n_checked += 1
    assert n_checked >= 2
    assert prof.down_inputs.shape == (8, 16, 32, 256)
    assert not prof.down_inputs[prof.input_count == 0].any()      # nothing recorded where nothing was routed


@pytest.fixture(scope="module")
def iq_plan(fixture_path, prof, tmp_path_factory):
    """A 2.5-bit plan over i-quants and K-quants, measured and converted with the profile's importance matrices."""
    layout = read_layout(fixture_path)
    imatrix = from_profile(prof, layout)
    costs = measure_costs(str(fixture_path), prof, types=("IQ2_XXS", "IQ3_XXS", "Q4_K"), imatrix=imatrix,
                          progress=False)
    plan, report = make_plan(costs, expert_bits=2.5)
    out = convert(fixture_path, tmp_path_factory.mktemp("iq") / "iq.gguf", plan, imatrix=imatrix, progress=False)
    return out, plan, report, imatrix


def test_iq_plan_is_written_with_each_experts_imatrix(fixture_path, iq_plan):
    out, plan, report, imatrix = iq_plan
    assert 2.4 < report["bits_per_weight"] <= 2.5
    assert {tn for types in plan.values() for tn in types} >= {"IQ2_XXS", "IQ3_XXS"}
    summary = verify(out.path)
    assert out.mixed and summary["unaligned_expert_ranges"] == 0 and summary["imatrix"] is True
    assert cli(["verify", out.path]) == 0
    data = np.memmap(out.path, dtype=np.uint8, mode="r")
    checked = set()
    for t in out.expert_tensors:
        for e in range(t.count):
            r = t.slice(e)
            if r.type in checked:
                continue
            w = source_expert(fixture_path, t.name, e)
            assert bytes(data[r.offset:r.offset + r.size]) == quant.quantize(w, r.type, imatrix[t.name][e])
            # another expert's importance matrix gives other bytes: each expert is quantized with its own
            assert bytes(data[r.offset:r.offset + r.size]) != quant.quantize(w, r.type, imatrix[t.name][e - 1])
            checked.add(r.type)
    assert checked == set(report["type_counts"]) - {tn for tn, n in report["type_counts"].items() if not n}


@patched
def test_iq_plan_runs_in_the_patched_runtime(fixture_path, iq_plan):
    """The same tokens and logits whole and streamed under a 25% budget, and close to the source file."""
    out = iq_plan[0]
    full = Llama(out.path, n_ctx=256, verbose=False)
    want = greedy(full, PROMPT, 24)
    full.close()
    llm = Llama(out.path, memory_budget="25%", n_ctx=256, verbose=False)
    got = greedy(llm, PROMPT, 24)
    llm.close()
    assert got[0] == want[0] and len(set(got[0])) > 4
    np.testing.assert_array_equal(got[1], want[1])
    src = Llama(str(fixture_path), n_ctx=256, logits_all=True, verbose=False)
    src.eval(src.tokenize(PROMPT.encode()) + want[0])
    ref = np.array(src.scores[src.n_tokens - 25:src.n_tokens], dtype=np.float64)
    src.close()

    def logsoftmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    p, q = logsoftmax(ref), logsoftmax(want[1].astype(np.float64))
    kl = (np.exp(p) * (p - q)).sum(axis=1)
    # measured: KL 0.001 nats/token on average, 0.006 at most, the same top-1 everywhere
    assert kl.mean() < 0.02 and kl.max() < 0.1 and (p.argmax(1) == q.argmax(1)).mean() >= 0.9, kl


def test_a_plan_quantizes_without_the_imatrix_where_that_measures_better(fixture_path, prof, tmp_path):
    """measure_costs tries every type that can do without an importance matrix both ways, per expert and
    tensor, and keeps the one with the smaller error on the expert's sampled inputs; convert writes the plan
    that way (imatrix_off), and refuses it for a type that needs the matrix."""
    from edgemoe_llamacpp.convert.plan import SWIGLU, _Experts, imatrix_off

    layout = read_layout(fixture_path)
    imatrix = from_profile(prof, layout)
    costs = measure_costs(str(fixture_path), prof, types=("Q2_K", "Q4_K"), imatrix=imatrix, progress=False)
    off = costs["imatrix_off"]                                           # [L, E, 3, T]
    assert off.shape == (8, 16, 3, 2) and off.any() and not off.all()
    experts = _Experts(layout)
    li, e, k, ti = (int(i) for i in np.argwhere(off)[0])
    on = np.argwhere(~off & (prof.input_count > 0)[..., None, None])[0]
    for (l_, e_, k_, t_), flag in (((li, e, k, ti), True), (tuple(int(i) for i in on), False)):
        n = int(prof.input_count[l_, e_])
        x = prof.inputs[l_, e_, :n].astype(np.float32)
        src = experts.weights(l_, e_)
        xk = x if k_ < 2 else (x @ src[0].T) / (1 + np.exp(-(x @ src[0].T))) * (x @ src[1].T)
        tn = costs["types"][t_]
        err = [float(np.square(xk @ (experts.weights(l_, e_, tn, m)[k_] - src[k_]).T).sum()) for m in (None, imatrix)]
        assert (err[0] < err[1]) == flag
    plan, _ = make_plan(costs, expert_bits=3.5)
    flags = imatrix_off(costs, plan)
    out = convert(fixture_path, tmp_path / "p.gguf", plan, imatrix=imatrix, imatrix_off=flags, progress=False)
    data = np.memmap(out.path, dtype=np.uint8, mode="r")
    seen = set()
    for t in out.expert_tensors:
        for x in range(t.count):
            r, flag = t.slice(x), flags[t.name][x]
            if (r.type, flag) in seen:
                continue
            w = source_expert(fixture_path, t.name, x)
            want = quant.quantize(w, r.type, None if flag else imatrix[t.name][x])
            assert bytes(data[r.offset:r.offset + r.size]) == want
            seen.add((r.type, flag))
    assert {flag for _, flag in seen} == {True, False}
    assert SWIGLU[k] in {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
    iq = uniform_plan(layout, "IQ2_XXS")
    with pytest.raises(EdgeMoEError, match="IQ2_XXS cannot be made without"):
        convert(fixture_path, tmp_path / "iq.gguf", iq, imatrix=imatrix,
                imatrix_off={name: [True] * len(ts) for name, ts in iq.items()}, progress=False)
    assert not (tmp_path / "iq.gguf").exists()


def test_choose_is_optimal_on_small_cases():
    rng = np.random.default_rng(3)
    for _ in range(30):
        cost = np.sort(rng.random((1, 4, 3)), axis=2)[..., ::-1] * rng.random((1, 4, 1))
        nbytes = np.array([[10, 17, 30]])
        budget = int(rng.integers(40, 121))
        idx = choose(cost, nbytes, budget)
        got = cost[0, np.arange(4), idx[0]].sum()
        best = min(sum(cost[0, e, c[e]] for e in range(4)) for c in itertools.product(range(3), repeat=4)
                   if sum(nbytes[0, x] for x in c) <= budget)
        assert nbytes[0, idx[0]].sum() <= budget
        assert got <= best * 1.25 + 1e-12          # Lagrangian + greedy fill: near the exact optimum
    with pytest.raises(BudgetError):
        choose(np.ones((1, 4, 3)), nbytes, 39)


def test_plan_spends_bits_where_the_output_moves(fixture_path, prof, tmp_path):
    from edgemoe_llamacpp.convert.plan import make_plan, measure_costs

    types = ("Q2_K", "Q4_K", "Q8_0")
    costs = measure_costs(str(fixture_path), prof, types=types, progress=False)
    assert costs["cost"].shape == (8, 16, 3, 3) and costs["nbytes"].shape == (8, 3, 3)
    # quantizing lower moves the output more, for every expert the profile saw, in gate/up and in down
    seen = prof.input_count > 0
    c = costs["cost"][seen]
    assert (c[:, 0, 2] > c[:, 1, 2]).all() and (c[:, 2, 0] > c[:, 2, 1]).all()
    assert (costs["cost"][:, :, 2, 2] == 0).all()            # Q8_0 is the source's own type
    plan, report = make_plan(costs, expert_bits=4.0)
    assert report["bits_per_weight"] <= 4.0 and len(report["type_counts"]) == 3
    assert sum(report["type_counts"].values()) == 8 * 16 * 3 == 3 * sum(report["schemes"].values())
    assert any("/" in k for k in report["schemes"])          # some experts' down differs from their gate/up
    gu = np.array([[types.index(tn) for tn in plan[f"blk.{layer}.ffn_gate_exps.weight"]] for layer in range(8)])
    assert all(plan[f"blk.{layer}.ffn_up_exps.weight"] == plan[f"blk.{layer}.ffn_gate_exps.weight"]
               for layer in range(8))
    share = prof.expert_stats()["share"]
    # experts routed to more often get at least as many bits on average
    busy = share > np.median(share)
    assert gu[busy].mean() > gu[~busy].mean()
    # one type per expert spends the same budget less well: a higher summed cost
    whole, whole_report = make_plan(costs, expert_bits=4.0, per_tensor=False)
    assert all(whole[f"blk.{layer}.ffn_{k}_exps.weight"] == whole[f"blk.{layer}.ffn_up_exps.weight"]
               for layer in range(8) for k in ("gate", "down"))
    assert whole_report["bits_per_weight"] <= 4.0 and whole_report["cost"] > report["cost"]
    with pytest.raises(EdgeMoEError):
        make_plan(costs, expert_bits=2.0)                  # below Q2_K's 2.625 bits
    assert quant.bits_per_weight("Q2_K") == 2.625


def test_a_scheme_costs_what_its_quantized_expert_does(fixture_path, prof):
    """cost[l, e, a, b] is the measured output change of the expert with gate/up at type a and down at type b;
    the tensors' errors are not independent, so it is not the sum of each tensor's alone."""
    from edgemoe_llamacpp.convert.plan import _Experts, _ffn, measure_costs

    types = ("Q2_K", "Q8_0")
    costs = measure_costs(str(fixture_path), prof, types=types, progress=False)
    experts, share = _Experts(read_layout(fixture_path)), prof.expert_stats()["share"]

    def measured(li, e, gu, down):
        n = int(prof.input_count[li, e])
        x = prof.inputs[li, e, :n].astype(np.float32)
        w2 = prof.input_weights[li, e, :n].astype(np.float64) ** 2
        g, u, _ = experts.weights(li, e, gu)
        d = _ffn([g, u, experts.weights(li, e, down)[2]], x) - _ffn(experts.weights(li, e), x)
        return share[li, e] * float(np.mean(w2 * (d.astype(np.float64) ** 2).sum(1)))

    pairs = list(zip(*np.nonzero(prof.input_count > 0), strict=True))[::13][:8]
    sums = []
    for li, e in pairs:
        li, e = int(li), int(e)
        for a, b in itertools.product(range(2), repeat=2):
            assert costs["cost"][li, e, a, b] == pytest.approx(measured(li, e, types[a], types[b]), rel=1e-5)
        sums.append(costs["cost"][li, e, 0, 1] + costs["cost"][li, e, 1, 0])
    whole = np.array([costs["cost"][li, e, 0, 0] for li, e in pairs])
    assert (np.abs(np.array(sums) / whole - 1) > 0.05).any()


def test_an_f16_source_is_planned_and_converted(fixture_path, prof, tmp_path):
    """The quality fixture's source is F16 (tools/make_tiny_moe.py --dtype F16): the planner reads its experts
    as the weights they are, and convert writes uniform and mixed files from it."""
    from edgemoe_llamacpp.convert.plan import _Experts, make_plan, measure_costs

    q8_layout = read_layout(fixture_path)
    f16 = convert(fixture_path, tmp_path / "f16.gguf", uniform_plan(q8_layout, "F16"), progress=False)
    assert {t.type for t in f16.expert_tensors} == {"F16"}
    rows = q8_layout.expert_bytes // quant.row_bytes("Q8_0", 256)          # rows of 256 values
    assert f16.expert_bytes == rows * quant.row_bytes("F16", 256) == rows * 512
    q8, half = _Experts(q8_layout), _Experts(f16)
    for a, b in zip(q8.weights(3, 5), half.weights(3, 5), strict=True):
        np.testing.assert_allclose(b, a, rtol=2**-10, atol=0)  # the Q8_0 values, rounded to half precision
    types = ("Q2_K", "Q4_K")
    costs = measure_costs(str(f16.path), prof, types=types, progress=False)
    ref = measure_costs(str(fixture_path), prof, types=types, progress=False)
    seen = prof.input_count > 0
    assert (costs["cost"][seen][..., 0] > costs["cost"][seen][..., 1]).all()
    # the same weights give the same costs, up to where half precision moves a value across a rounding step
    np.testing.assert_allclose(costs["cost"].sum((0, 1)), ref["cost"].sum((0, 1)), rtol=0.02)
    np.testing.assert_allclose(costs["cost"][seen], ref["cost"][seen], rtol=0.25)
    plan, report = make_plan(costs, expert_bits=3.5)
    mixed = convert(f16.path, tmp_path / "plan.gguf", plan, progress=False)
    assert report["bits_per_weight"] <= 3.5 and mixed.mixed and verify(mixed.path)["checksums"] == "ok"
    q2 = convert(f16.path, tmp_path / "q2k.gguf", uniform_plan(f16, "Q2_K"), progress=False)
    direct = convert(fixture_path, tmp_path / "q2k-from-q8.gguf", uniform_plan(f16, "Q2_K"), progress=False)
    assert q2.expert_bytes == direct.expert_bytes and {t.type for t in q2.expert_tensors} == {"Q2_K"}
    logits = {}
    for path in (fixture_path, f16.path, q2.path):
        llm = Llama(str(path), n_ctx=128, verbose=False)
        logits[path] = greedy(llm, PROMPT, 4)[1][0]          # the next token's logits after the prompt
        llm.close()
    np.testing.assert_allclose(logits[f16.path], logits[fixture_path], atol=0.05)
    assert np.isfinite(logits[q2.path]).all() and np.abs(logits[q2.path] - logits[fixture_path]).max() > 0.05


@pytest.mark.stock
def test_per_layer_plan_file_loads_in_stock_llama_cpp(fixture_path, tmp_path):
    import json

    layout = read_layout(fixture_path)
    plan = {t.name: ("Q4_K" if t.layer < 4 else "Q6_K") for t in layout.expert_tensors}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "layers.gguf"
    assert cli(["convert", str(fixture_path), str(out), "--plan", str(tmp_path / "plan.json")]) == 0
    conv = read_layout(out)
    assert not conv.mixed and {(t.layer < 4, t.type) for t in conv.expert_tensors} == {(True, "Q4_K"),
                                                                                       (False, "Q6_K")}
    tokens, _ = stock.greedy(out, PROMPT, 8, tmp_path / "logits.npy", n_ctx=128)
    assert len(tokens) == 8


def test_stock_helper_refuses_mixed_files(mixed):
    from edgemoe_llamacpp.engine.llama import stock_llama
    from edgemoe_llamacpp.errors import MixedTypesError

    with pytest.raises(MixedTypesError):
        stock_llama(mixed.path)


def test_every_expert_of_a_mixed_file_is_page_aligned(fixture_path, tmp_path):
    """Q2_K/Q3_K slots (21,504 and 28,160 bytes) and a tensor all at Q6_K (53,760) are not page multiples."""
    layout = read_layout(fixture_path)
    plan = {t.name: (["Q6_K"] * t.count if t.layer == 0 else [("Q2_K", "Q3_K")[e % 2] for e in range(t.count)])
            for t in layout.expert_tensors}
    out = convert(fixture_path, tmp_path / "aligned.gguf", plan, progress=False)
    page = os.sysconf("SC_PAGE_SIZE")
    assert all(r.offset % page == 0 for x in out.experts for r in x.ranges)
    assert verify(out.path)["unaligned_expert_ranges"] == 0
    # declared at the first type at least as wide whose slot is whole pages: Q3_K -> Q4_K, Q6_K -> Q8_0
    assert {(t.layer == 0, t.type) for t in out.expert_tensors} == {(True, "Q8_0"), (False, "Q4_K")}
    assert out.expert_bytes == sum(quant.row_bytes(tn, 256) * 256 for types in plan.values() for tn in types)


@pytest.mark.parametrize("target", ["F32", "Q4_K"])
def test_converting_a_converted_file_reads_each_expert_at_its_own_type(iq_plan, tmp_path, target):
    """A file with per-expert i-quants converted again: every expert is dequantized at its own type (not the
    tensor's declared slot type), so an F32 copy equals gguf-py's dequantize of the source expert and a
    Q4_K copy is finite (it was NaN: the slots were read as Q4_K)."""
    src = iq_plan[0]
    out = convert(src.path, tmp_path / f"again-{target}.gguf", uniform_plan(src, target), progress=False)
    data = np.memmap(out.path, dtype=np.uint8, mode="r")
    source = np.memmap(src.path, dtype=np.uint8, mode="r")
    types_seen = set()
    for t, s in zip(out.expert_tensors, src.expert_tensors, strict=True):
        assert t.name == s.name
        for e in range(t.count):
            r, rs = t.slice(e), s.slice(e)
            got = quant.ggml_dequantize(data[r.offset:r.offset + r.size], r.type)
            want = quant.dequantize(source[rs.offset:rs.offset + rs.size], rs.type, got.size).reshape(-1)
            assert np.isfinite(got).all(), (t.name, e)
            if target == "F32":
                np.testing.assert_array_equal(got, want)
            else:           # Q4_K rounding of the source expert, not of garbage
                assert np.abs(got - want).max() <= 0.25 * np.abs(want).max(), (t.name, e)
            types_seen.add(rs.type)
    assert {"IQ2_XXS", "IQ3_XXS"} <= types_seen
    assert verify(out.path)["finite_expert_ranges"] == len(out.experts) * 3


def _refresh_checksums(path: Path) -> None:
    """Rewrite a converted file's checksum table for its current bytes (damage that the checksums hide)."""
    import hashlib

    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    tensors = {t.name: t for t in reader.tensors}
    names = reader.fields["edgemoe.checksum.tensors"].contents()
    field = reader.fields["edgemoe.checksum.sha256"]
    for name, idx in zip(names, field.data, strict=True):
        t = tensors[name]
        digest = hashlib.sha256(np.asarray(reader.data[t.data_offset:t.data_offset + int(t.n_bytes)])).hexdigest()
        field.parts[idx][:] = np.frombuffer(digest.encode(), dtype=np.uint8)
    reader.data.flush()


@pytest.fixture(scope="module")
def nan_file(fixture_path, tmp_path_factory):
    """A uniform Q4_K file whose layer-2 down experts all have NaN block scales, checksums made to match."""
    path = tmp_path_factory.mktemp("nan") / "nan.gguf"
    out = convert(fixture_path, path, uniform_plan(read_layout(fixture_path), "Q4_K"), progress=False)
    t = next(t for t in out.expert_tensors if t.name == "blk.2.ffn_down_exps.weight")
    data = np.memmap(path, dtype=np.uint8, mode="r+")
    blocks = data[t.offset:t.offset + t.nbytes].reshape(-1, 144)     # Q4_K blocks: f16 d first
    blocks[:, 0], blocks[:, 1] = 0x00, 0x7E                          # f16 NaN
    data.flush()
    del data, blocks
    _refresh_checksums(path)
    return path


def test_verify_fails_on_non_finite_expert_weights(nan_file, capsys):
    with pytest.raises(BadModelError, match=r"blk\.2\.ffn_down_exps\.weight holds [\d,]+ non-finite weights"):
        verify(nan_file)
    assert cli(["verify", str(nan_file)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("check weights")]
    assert len(err) == 1 and "non-finite weights" in err[0]        # one line, beside the progress bar


@pytest.mark.parametrize("command", [["run", "-p", PROMPT, "-n", "8"], ["run", "-p", PROMPT, "-n", "8", "--stock"],
                                     ["ppl", "--tokens", "256", "--n-ctx", "128"]])
def test_run_and_ppl_refuse_non_finite_logits(nan_file, command):
    proc = subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", command[0], str(nan_file), *command[1:]],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "non-finite logits" in proc.stderr.strip().splitlines()[-1]
    assert "perplexity" not in proc.stdout and "---" not in proc.stdout


def test_inspect_shows_each_tensors_type_mix_and_the_mean_expert(fixture_path, tmp_path, capsys):
    """A file whose layer-1 experts hold several types: inspect counts the experts at each type per tensor
    (it used to print the type the tensor is declared at, its largest) and gives the mean and range of the
    experts' bytes (it used to print expert 0's); --json adds the same per layer and keeps every field."""
    layout = read_layout(fixture_path)
    plan = uniform_plan(layout, "Q4_K")
    for t in layout.expert_tensors:
        if t.layer == 1:
            plan[t.name] = ["Q3_K"] * 10 + ["Q6_K"] * 4 + ["Q4_K"] * 2
    out = convert(fixture_path, tmp_path / "mix.gguf", plan, progress=False)
    sizes = [out.expert(1, e).nbytes for e in range(16)]
    assert cli(["inspect", str(out.path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[4:]}
    mean = f"{round(sum(sizes) / 16):,} ({min(sizes):,}-{max(sizes):,})"
    assert rows["1"].split(mean)[1].split("MiB")[1].strip() == (
        "ffn_down_exps: 10 Q3_K, 4 Q6_K, 2 Q4_K; ffn_gate_exps: 10 Q3_K, 4 Q6_K, 2 Q4_K; "
        "ffn_up_exps: 10 Q3_K, 4 Q6_K, 2 Q4_K"), rows["1"]
    assert rows["0"].split()[1] == f"{out.expert(0, 0).nbytes:,}" and "ffn_gate_exps: 16 Q4_K" in rows["0"]
    assert cli(["inspect", str(out.path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(out.to_dict()) < set(doc)
    (one,) = [x for x in doc["layers"] if x["layer"] == 1]
    assert one["types"]["ffn_gate_exps"] == {"Q3_K": 10, "Q6_K": 4, "Q4_K": 2}
    assert one["expert_bytes"] == {"mean": sum(sizes) / 16, "min": min(sizes), "max": max(sizes)}
