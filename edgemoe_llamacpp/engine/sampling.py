"""llama.cpp's sampling step under a grammar, ending the text when the grammar admits no token.

llama.cpp would accept the -inf token its dist sampler drew anyway, find no grammar stack left, and throw
through its C API ("Unexpected empty grammar stack"), which aborts the process.
"""
from __future__ import annotations

import ctypes
import logging
import math

import llama_cpp.llama_cpp as lc
import numpy as np

from edgemoe_llamacpp.errors import ArgumentError

log = logging.getLogger(__name__)
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])   # llama_token_data


def sample_within_grammar(sampler, ctx, idx: int, n_vocab: int, eos: int) -> int:
    """llama_sampler_sample (llama-cpp-python's LlamaSampler.sample), except that a grammar that admits no
    token ends the text (`eos`)."""
    logits = lc.llama_get_logits_ith(ctx.ctx, idx)
    if not logits:
        raise ArgumentError(f"no logits at position {idx} to sample from")
    cur = np.empty(n_vocab, dtype=TOKEN_DATA)
    cur["id"] = np.arange(n_vocab, dtype=np.int32)
    cur["logit"] = np.ctypeslib.as_array(logits, shape=(n_vocab,))
    cur["p"] = 0.0
    cur_p = lc.llama_token_data_array(data=cur.ctypes.data_as(lc.llama_token_data_p), size=n_vocab, selected=-1,
                                      sorted=False)
    lc.llama_sampler_apply(sampler.sampler, ctypes.byref(cur_p))
    if not 0 <= cur_p.selected < cur_p.size:
        raise RuntimeError(f"llama.cpp's samplers selected no token ({cur_p.selected})")
    chosen = cur_p.data[cur_p.selected]
    if math.isinf(chosen.logit) and chosen.logit < 0:
        if eos < 0:
            raise ArgumentError("the grammar admits no token after this text, and the model has no end token")
        log.warning("the grammar admits no token after this text: ending it")
        return eos
    lc.llama_sampler_accept(sampler.sampler, chosen.id)
    return chosen.id
