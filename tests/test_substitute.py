"""Low-bit substitution on a miss: files with low-bit copies, HOBBIT's rule, the kernel reading the copies."""
import itertools
from pathlib import Path

import numpy as np
import pytest

from edgemoe_llamacpp import pages, runtime
from edgemoe_llamacpp.convert.rewrite import convert, uniform_plan
from edgemoe_llamacpp.engine.llama import Llama, stock_llama
from edgemoe_llamacpp.engine.substitute import weight_above
from edgemoe_llamacpp.errors import BadModelError, EdgeMoEError, MixedTypesError
from edgemoe_llamacpp.gguf.layout import read_layout

pytestmark = pytest.mark.skipif(not runtime.patched(), reason="substitution needs the patched runtime")
PROMPT = b"import os\nimport sys\n\n\ndef main(argv):\n    "


@pytest.fixture(scope="module")
def lowbit(fixture_path, tmp_path_factory):
    return convert(fixture_path, tmp_path_factory.mktemp("sub") / "lowbit.gguf",
                   uniform_plan(read_layout(fixture_path), "Q8_0"), lowbit="Q2_K", progress=False)


@pytest.fixture(scope="module")
def imatrix(fixture_path):
    """Importance matrices (random, positive) for every stacked tensor: IQ2_XXS copies cannot be made without."""
    rng = np.random.default_rng(7)
    return {t.name: rng.uniform(0.1, 2.0, (t.count, 256)).astype(np.float32)
            for t in read_layout(fixture_path).expert_tensors}


@pytest.fixture(scope="module")
def iq2_lowbit(fixture_path, imatrix, tmp_path_factory):
    return convert(fixture_path, tmp_path_factory.mktemp("sub") / "iq2-lowbit.gguf",
                   uniform_plan(read_layout(fixture_path), "Q8_0"), lowbit="IQ2_XXS", imatrix=imatrix, progress=False)


class Recording(Llama):
    """Keeps, per MoE layer evaluation, the chosen experts that ran from their low-bit copies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        route, pointers = self.edgemoe.on_route, self.edgemoe.pointers

        def on_route(layer, ids, hidden=None, weights=None):
            route(layer, ids, hidden, weights)
            pointed_low = pointers.low[layer] if pointers else set()
            self.ran_low.append((layer, pointed_low & set(ids.ravel().tolist())))

        self.edgemoe.on_route = on_route


def make(path, **kw):
    llm = Recording(str(path), n_ctx=256, logits_all=True, verbose=False, **kw)
    llm.ran_low = []
    return llm


def test_weight_above_is_hobbits_rank_sum():
    ids = np.array([[3, 5], [5, 1]])
    w = np.array([[0.3, 0.7], [0.9, 0.1]])
    # token 0: 5 first (0), 3 after 0.7; token 1: 5 first (0), 1 after 0.9; expert 5 keeps its least: 0
    assert weight_above(ids, w) == pytest.approx({5: 0.0, 3: 0.7, 1: 0.9})


def test_low_copies_are_the_experts_at_the_low_type(fixture_path, lowbit):
    q2k = convert(fixture_path, f"{lowbit.path}.q2k", uniform_plan(read_layout(fixture_path), "Q2_K"),
                  progress=False)
    with open(lowbit.path, "rb") as a, open(q2k.path, "rb") as b:
        for t, u in zip(lowbit.expert_tensors, q2k.expert_tensors, strict=True):
            assert t.low.type == "Q2_K" and t.low.offset % pages.PAGE == 0 and t.low.stride % pages.PAGE == 0
            for e in range(t.count):
                r, s = t.low_slice(e), u.slice(e)
                a.seek(r.offset)
                b.seek(s.offset)
                assert r.size == s.size and a.read(r.size) == b.read(s.size)
    assert lowbit.expert_bytes == read_layout(fixture_path).expert_bytes     # copies are not model experts


def test_stock_refuses_and_edgemoe_needs_copies_to_substitute(fixture_path, lowbit):
    with pytest.raises(MixedTypesError, match="low-bit copies"):
        stock_llama(lowbit.path, n_ctx=64, verbose=False)
    with pytest.raises(EdgeMoEError, match="no low-bit copies"):
        Llama(str(fixture_path), memory_budget="25%", substitute=0.6, verbose=False)
    with pytest.raises(EdgeMoEError, match=r"\[0, 1\)"):
        Llama(lowbit.path, memory_budget="25%", substitute=1.5, verbose=False)


@pytest.mark.parametrize("low", ["Q2_K", "IQ2_XXS"])
def test_first_token_computes_the_low_copies_exactly(fixture_path, request, imatrix, tmp_path, low):
    """Cold cache, one token: every chosen expert misses; with threshold 0 each one ranked below another
    runs from its low-bit copy. The logits equal those of a file whose experts are at the low type exactly
    there (quantized with the same importance matrices)."""
    lowbit = request.getfixturevalue("lowbit" if low == "Q2_K" else "iq2_lowbit")
    assert lowbit.lowbit_type == low
    llm = make(lowbit.path, memory_budget="25%", substitute=0.0)
    tok = llm.tokenize(b"def")[:1]
    llm.eval(tok)
    logits = np.array(llm.scores[0])
    ran_low = dict(llm.ran_low)
    assert llm.edgemoe_stats()["total"]["substituted"] == sum(len(v) for v in ran_low.values()) > 0
    llm.close()
    assert all(len(v) == 1 for v in ran_low.values())        # top-2: the second expert of each layer
    layout = read_layout(fixture_path)
    plan = {t.name: [low if e in ran_low[t.layer] else "Q8_0" for e in range(t.count)]
            for t in layout.expert_tensors}
    ref = make(convert(fixture_path, tmp_path / "ref.gguf", plan, progress=False,
                       imatrix=imatrix if low == "IQ2_XXS" else None).path)
    ref.eval(tok)
    assert np.array_equal(np.array(ref.scores[0]), logits)
    ref.close()
    full = make(lowbit.path, memory_budget="25%")
    full.eval(tok)
    assert not np.array_equal(np.array(full.scores[0]), logits)     # the copies did run
    full.close()


def greedy_steps(llm, n, switch_at=None, threshold=None):
    """Prompt then n greedy tokens; substitution (if built with it) held off until decode step `switch_at`."""
    cache = llm.edgemoe.cache
    held, cache.substitute = cache.substitute, None if switch_at is not None else cache.substitute
    llm.eval(llm.tokenize(PROMPT))
    marks = [len(llm.ran_low)]
    for step in range(n):
        if step == switch_at:
            cache.substitute = threshold if threshold is not None else held
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        marks.append(len(llm.ran_low))
    return np.array(llm.scores[:llm.n_tokens]), marks


def test_output_changes_only_once_substitution_ran(lowbit):
    """Registered tensors, substitution on but held off for the prompt and 8 tokens: logits identical to the
    run without it; from the step where a copy first ran, they differ."""
    n, switch = 32, 8
    base = make(lowbit.path, memory_budget="25%")
    ref, _ = greedy_steps(base, n)
    base.close()
    llm = make(lowbit.path, memory_budget="25%", substitute=0.6)
    got, marks = greedy_steps(llm, n, switch_at=switch)
    stats = llm.edgemoe_stats()["total"]
    runs = [any(low for _, low in llm.ran_low[a:b]) for a, b in itertools.pairwise(marks)]
    llm.close()
    assert stats["substituted"] > 0 and stats["substituted_bytes"] > 0
    first = runs.index(True)                  # the decode step whose eval first ran a copy
    assert first >= switch and not any(runs[:switch])
    upto = len(ref) - n + first               # score rows computed before that eval
    assert np.array_equal(got[:upto], ref[:upto])
    assert not np.array_equal(got[upto:], ref[upto:])


def test_no_substitution_without_a_budget_that_misses(lowbit):
    for budget in (None, "100%"):
        llm = make(lowbit.path, memory_budget=budget, substitute=0.0)
        greedy_steps(llm, 4)
        assert llm.edgemoe_stats()["total"]["substituted"] == 0 and llm.edgemoe.pointers is None
        llm.close()


def test_bad_low_copies_are_refused(lowbit, tmp_path):
    blob = Path(lowbit.path).read_bytes()
    key = blob.index(b"edgemoe.lowbit_type")
    at = blob.index(b"Q2_K", key)                     # the value: after the key, its type and length
    for value, needle in ((b"Q9_K", "lowbit_type"), (b"Q8_0", "does not hold")):   # unknown; too big for a slot
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(blob[:at] + value + blob[at + 4:])
        with pytest.raises(BadModelError, match=needle):
            read_layout(bad)


def test_cli_convert_lowbit_verify_and_run_substituting(fixture_path, tmp_path):
    import json
    import subprocess
    import sys

    def edgemoe(*args):
        return subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", *args], capture_output=True, text=True,
                              timeout=300, check=False)

    out = tmp_path / "copies.gguf"
    bad = edgemoe("convert", str(fixture_path), str(out), "--uniform", "Q8_0", "--lowbit", "IQ1_S")
    assert bad.returncode == 2 and "low-bit copies can be" in bad.stderr and not out.exists()
    bad = edgemoe("convert", str(fixture_path), str(out), "--uniform", "Q8_0", "--lowbit", "IQ2_XS")
    assert bad.returncode == 2 and "IQ2_XS cannot be made without importance matrices" in bad.stderr
    assert not out.exists()
    assert edgemoe("convert", str(fixture_path), str(out), "--uniform", "Q8_0", "--lowbit", "Q2_K").returncode == 0
    assert "384 Q2_K copy ranges (0 not page-aligned)" in edgemoe("verify", str(out)).stdout
    run = edgemoe("run", str(out), "-p", "import os\n", "-n", "16", "--memory-budget", "25%", "--substitute",
                  "--json")
    stats = json.loads(run.stdout)["stats"]
    assert run.returncode == 0 and stats["substitute"] == 0.6 and stats["total"]["substituted"] > 0
    plain = edgemoe("run", str(fixture_path), "-p", "x", "--memory-budget", "25%", "--substitute", "0.5")
    assert plain.returncode == 2 and "no low-bit copies" in plain.stderr


def test_copies_count_in_the_budget_by_mincore(lowbit):
    llm = make(lowbit.path, memory_budget="25%", substitute=0.0)
    cache = llm.edgemoe.cache
    llm.eval(llm.tokenize(PROMPT))
    worst = 0
    for _ in range(24):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        worst = max(worst, cache.measured_resident_bytes())     # expert and copy tensors, as the kernel sees them
    ran_low = llm.edgemoe_stats()["total"]["substituted"]
    llm.close()
    assert ran_low > 0 and 0 < worst <= cache.budget
