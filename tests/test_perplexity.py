"""`edgemoe ppl`: perplexity, KL from a reference and per-window log-likelihoods, checked against llama.cpp's logits."""
import math

import numpy as np
import pytest

from edgemoe_llamacpp import corpus
from edgemoe_llamacpp.convert.rewrite import convert, uniform_plan
from edgemoe_llamacpp.engine.llama import stock_llama
from edgemoe_llamacpp.engine.perplexity import paired_difference, perplexities, perplexity
from edgemoe_llamacpp.gguf.layout import read_layout

N_CTX = 128


@pytest.fixture(scope="module")
def q2k(fixture_path, tmp_path_factory):
    return convert(fixture_path, tmp_path_factory.mktemp("ppl") / "q2k.gguf",
                   uniform_plan(read_layout(fixture_path), "Q2_K"), progress=False).path


def test_perplexity_is_the_mean_log_likelihood_of_llama_cpps_logits(fixture_path):
    r = perplexity(str(fixture_path), tokens=4 * N_CTX, n_ctx=N_CTX, progress=False)
    llm = stock_llama(str(fixture_path), use_extra_bufts=False, n_ctx=N_CTX, logits_all=True, verbose=False)
    nll = []
    for window in corpus.windows(corpus.tokens(llm, corpus.split_texts("validation"), 4 * N_CTX), N_CTX):
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:N_CTX - 1], dtype=np.float64)
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll.append(float((lse - logits[np.arange(N_CTX - 1), window[1:]]).sum()))
    llm.close()
    assert r["windows"] == 4 and r["tokens"] == 4 * (N_CTX - 1)
    assert r["window_nll"] == pytest.approx(nll, rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(sum(nll) / r["tokens"]), rel=1e-6)


def test_several_models_on_the_same_windows_against_a_reference(fixture_path, q2k):
    same, low = perplexities([str(fixture_path), q2k], tokens=4 * N_CTX, n_ctx=N_CTX, reference=str(fixture_path),
                             progress=False)
    assert same["kld"] == pytest.approx(0.0, abs=1e-9) and same["same_top1"] == 1.0
    assert low["kld"] > 1e-4 and low["same_top1"] < 1.0 and low["windows"] == same["windows"]
    # per window, for paired comparisons: every window diverges, and they add up to the total
    assert len(low["window_kld"]) == low["windows"] and min(low["window_kld"]) > 0
    assert sum(low["window_kld"]) / low["tokens"] == pytest.approx(low["kld"], rel=1e-5)
    alone = perplexity(q2k, tokens=4 * N_CTX, n_ctx=N_CTX, reference=str(fixture_path), progress=False)
    assert alone["perplexity"] == low["perplexity"] and alone["kld"] == low["kld"]


def test_token_by_token_scores_what_a_window_at_once_scores(fixture_path):
    whole = perplexity(str(fixture_path), tokens=2 * N_CTX, n_ctx=N_CTX, progress=False)
    single = perplexity(str(fixture_path), tokens=2 * N_CTX, n_ctx=N_CTX, batch=1, progress=False)
    assert single["batch"] == 1 and whole["batch"] == N_CTX
    assert single["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-3)    # other kernels, same model


def test_paired_difference_by_hand():
    # windows of 2 tokens; per-window differences 2, 3, 4: mean 9 / 6 tokens, sample s.d. 1 -> s.e. sqrt(3) / 6
    d = paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0], tokens=6)
    assert d["delta_nll_per_token"] == pytest.approx(1.5)
    assert d["standard_error"] == pytest.approx(math.sqrt(3) / 6)
