"""Routing recorded through llama.cpp: the experts each MoE layer chose, and the FFN input it chose them from.

`record` runs long texts in independent windows through a plain llama_cpp.Llama with the hook and returns one
(tokens, k) array per MoE layer: what predictors are fitted and scored on (tools/predictor_recall.py).
`record_completion` and `record_windows` run edgemoe's Llama without a budget and return steps
(layer, ids (T, k), ffn_inp (T, n_embd)) in the order the hook saw them: what `replay.replay` replays
(tools/policy_replay.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgemoe_llamacpp import corpus
from edgemoe_llamacpp.cache.predict import FFN_INP
from edgemoe_llamacpp.engine.hook import ExpertHook
from edgemoe_llamacpp.engine.llama import Llama, llama_params
from edgemoe_llamacpp.gguf.header import read_header
from edgemoe_llamacpp.gguf.layout import read_layout

N_CTX = 512           # tokens per window of `record`, at most


def window_of(model: str) -> int:
    """The windows `record` evaluates `model` in: N_CTX tokens, or the context it was trained on if shorter
    (positions past it were never trained: routing there is not the model's)."""
    layout = read_layout(model)
    trained = read_header(layout.path).fields.get(f"{layout.arch}.context_length")
    return min(N_CTX, int(trained.contents())) if trained is not None else N_CTX


def tokens_of(llm, texts: list[str], n: int, seed: int | None, window: int = N_CTX) -> np.ndarray:
    """The first n tokens of `texts` (in a seeded random file order if seed is given), documents separated by
    the end-of-text token, as the fixture was trained; whole windows of `window` only."""
    order = np.random.default_rng(seed).permutation(len(texts)) if seed is not None else range(len(texts))
    out: list[int] = []
    for i in order:
        out += llm.tokenize(texts[i].encode("utf-8"), add_bos=False, special=False) + [llm.token_eos()]
        if len(out) >= n:
            break
    return np.asarray(out[:n // window * window], dtype=np.int32)


def record(model: str, texts: list[str], n: int, *, seed: int | None, hidden: bool):
    """Routing (and ffn_inp) of every MoE layer for n tokens of `texts`, in independent windows (window_of).
    Returns (tokens, routing[pos] (N, k), hidden[pos] (N, n_embd) or None)."""
    import llama_cpp

    layout = read_layout(model)
    pos = {layer: i for i, layer in enumerate(layout.moe_layers)}
    ids: list[list[np.ndarray]] = [[] for _ in pos]
    hid: list[list[np.ndarray]] = [[] for _ in pos]

    def on_route(layer, chosen, h, _weights):
        ids[pos[layer]].append(chosen)
        if h is not None:
            hid[pos[layer]].append(h)

    hook = ExpertHook(on_route=on_route, hidden_node=FFN_INP if hidden else None)
    with llama_params(use_extra_bufts=False, cb_eval=hook.callback):
        # logits for every token: otherwise llama.cpp computes the last layer for the last token only
        window = window_of(model)
        llm = llama_cpp.Llama(layout.path, n_ctx=window, n_batch=window, logits_all=True, verbose=False)
    tokens = tokens_of(llm, texts, n, seed, window)
    for s in tqdm(range(0, len(tokens), window), desc=Path(model).name, unit="window"):
        llm.reset()
        with hook.evaluation():
            llm.eval(tokens[s:s + window].tolist())
    llm.close()
    routing = [np.concatenate(x) for x in ids]
    if not all(len(r) == len(tokens) for r in routing):
        raise RuntimeError("a layer was not routed for every token")
    return tokens, routing, [np.concatenate(x) for x in hid] if hidden else None


def recording(model: str, **kwargs) -> tuple[Llama, list]:
    """edgemoe's Llama (no budget, the gate predictor's FFN input kept) and the list where each layer's routing
    and FFN input go as the hook sees them: (layer, ids, hidden), by wrapping its engine's `on_route`."""
    llm = Llama(model, memory_budget=None, predictor="gate", n_ctx=512, verbose=False, **kwargs)
    steps: list = []
    route = llm.edgemoe.on_route

    def on_route(layer, ids, hidden=None, weights=None):
        steps.append((layer, ids, hidden))
        route(layer, ids, hidden, weights)

    llm.edgemoe.on_route = on_route
    return llm, steps


def record_completion(model: str, prompt: str, tokens: int) -> list:
    """Steps of one greedy completion of `tokens` tokens after `prompt`."""
    llm, steps = recording(model)
    llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, repeat_penalty=1.1)
    llm.close()
    return steps


def record_windows(model: str, windows: int, n_tokens: int) -> list[list]:
    """Steps of `windows` windows of held-out text, each token's layers in turn (as decoding would see them)."""
    llm, steps = recording(model, logits_all=True)
    ids = corpus.tokens(llm, corpus.split_texts("validation"), windows * n_tokens)
    traces = []
    for w in corpus.windows(ids, n_tokens)[:windows]:
        steps.clear()
        llm.reset()
        llm.eval(w)
        traces.append([(layer, chosen[t:t + 1], hidden[t:t + 1]) for t in range(len(w))
                       for layer, chosen, hidden in steps])
    llm.close()
    return traces
