"""The arguments of a Llama's calls, checked before llama.cpp sees them.

llama.cpp aborts the process, or reads out of bounds, on a token id outside the vocabulary, a grammar that
does not parse, a non-finite sampling value or an empty prompt. Each check here raises ArgumentError (a
ValueError, as llama-cpp-python raises) naming the bad value instead; a prompt over the context window is a
ContextLengthError. (The constructor's cache options are checked by cache_config.CacheConfig.)
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as lc

from edgemoe_llamacpp.checks import is_int, is_real
from edgemoe_llamacpp.errors import ArgumentError, ContextLengthError, EdgeMoEError

CONTEXT_EXCEEDED = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
# llama.cpp parses GBNF recursively, one C++ frame per nesting level: deep nesting overflows the thread's stack
MAX_GRAMMAR_DEPTH = 64
MAX_GRAMMAR_BYTES = 1 << 20
# llama_cpp.Llama's real-valued sampling arguments (None stands for the default)
SAMPLING_REALS = ("temperature", "temp", "top_p", "min_p", "typical_p", "frequency_penalty", "presence_penalty",
                  "repeat_penalty", "tfs_z", "mirostat_tau", "mirostat_eta")


def grammar_depth(text: str) -> int:
    """The deepest parenthesis nesting of a GBNF grammar (quoted strings, character classes and comments
    skipped), which is how deep llama.cpp's parser recurses."""
    depth = deepest = i = 0
    while i < len(text):
        c = text[i]
        if c in "\"[":
            close, i = '"' if c == '"' else "]", i + 1
            while i < len(text) and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < len(text) and text[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


@functools.cache
def signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def bind(fn, self, args, kwargs) -> dict:
    """Every argument of a call of llama_cpp.Llama.`fn`, by name, defaults filled in."""
    bound = signature(fn).bind(self, *args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


@contextlib.contextmanager
def context_errors():
    """llama-cpp-python's "Requested tokens (N) exceed context window of M" as a ContextLengthError."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, EdgeMoEError) or not CONTEXT_EXCEEDED.search(str(e)):
            raise
        raise ContextLengthError(f"{e}: shorten the prompt, or load the model with a larger n_ctx") from None


def check_context(n_tokens: int, n_ctx: int) -> None:
    """Refuse `n_tokens` tokens in a context of `n_ctx`, in llama-cpp-python's words."""
    if n_tokens > n_ctx:
        raise ContextLengthError(f"Requested tokens ({n_tokens}) exceed context window of {n_ctx}")


def check_sample_position(idx, logits: tuple[int, int] | None) -> None:
    """sample(idx=...) needs logits at `idx`; `logits` is the range of positions that have them (None: none)."""
    if logits is None:
        raise ArgumentError("sample() needs logits: eval() tokens first")
    lo, hi = logits
    if idx is not None and not (is_int(idx) and lo <= idx < hi):
        raise ArgumentError(f"sample(idx=...) must be a position with logits, from {lo} to {hi - 1}")


def check_text(what: str, text) -> None:
    if not isinstance(text, str):
        raise ArgumentError(f"{what} must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ArgumentError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None


@dataclass(frozen=True)
class ArgumentChecks:
    """The checks that depend on the loaded model: its vocabulary (size, and llama.cpp's handle for parsing
    grammars), whether it keeps every position's logits, whether it gives embeddings."""

    n_vocab: int
    vocab: Any                 # llama_vocab_p
    logits_all: bool
    embeddings: bool

    def tokens(self, tokens, what: str) -> None:
        n = self.n_vocab
        try:
            bad = [t for t in tokens if not is_int(t) or not 0 <= t < n]
        except TypeError:
            raise ArgumentError(f"{what} must be a list of token ids") from None
        if bad:
            shown = ", ".join(repr(t)[:24] for t in bad[:4])
            raise ArgumentError(f"{what}: token ids are integers from 0 to {n - 1} (this model's vocabulary), "
                                f"not {shown}")

    def completion(self, args: dict) -> None:
        """The arguments of a create_completion call (bound by name)."""
        prompt = args["prompt"]
        if isinstance(prompt, str):
            check_text("prompt", prompt)
        elif isinstance(prompt, list):
            self.tokens(prompt, "prompt")
        else:
            raise ArgumentError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")
        if args["suffix"] is not None:
            check_text("suffix", args["suffix"])
        if len(prompt) == 0:     # llama-cpp-python would start from a BOS token it never evaluates
            raise ArgumentError("the prompt is empty: give at least one token (text, or a list of token ids "
                                "such as [BOS])")
        stop = args["stop"]
        for s in [stop] if isinstance(stop, str) else (stop or []):
            check_text("stop", s)
        if args["max_tokens"] is not None and not is_int(args["max_tokens"]):
            raise ArgumentError(f"max_tokens must be an integer or None, not {args['max_tokens']!r}")
        self.logprobs("logprobs", args["logprobs"])
        self.sampling(args, llama_cpp.Llama.create_completion)

    def logprobs(self, what: str, n) -> None:
        if n is None:
            return
        if not is_int(n) or not 0 <= n <= self.n_vocab:
            raise ArgumentError(f"{what} must be an integer from 0 to {self.n_vocab}, not {n!r}")
        if not self.logits_all:
            raise ArgumentError(f"{what} needs the model loaded with logits_all=True")

    def sampling(self, args: dict, fn) -> None:
        """Sampling arguments of a call of llama_cpp.Llama.`fn` (bound by name); None becomes the default."""
        defaults = signature(fn).parameters
        for name in SAMPLING_REALS:
            if name not in args:
                continue
            if args[name] is None:
                args[name] = defaults[name].default
            elif not is_real(args[name]):
                raise ArgumentError(f"{name} must be a finite number, not {args[name]!r}")
        if "top_k" in args and not is_int(args["top_k"]):
            raise ArgumentError(f"top_k must be an integer, not {args['top_k']!r}")
        if args.get("mirostat_mode", 0) not in (0, 1, 2) or isinstance(args.get("mirostat_mode"), bool):
            raise ArgumentError(f"mirostat_mode is 0, 1 or 2, not {args['mirostat_mode']!r}")
        if args.get("seed") is not None and not is_int(args["seed"]):
            raise ArgumentError(f"seed must be an integer, not {args['seed']!r}")
        self.logit_bias(args.get("logit_bias"))
        self.grammar(args.get("grammar"))

    def logit_bias(self, bias) -> None:
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ArgumentError("logit_bias maps token ids to biases")
        for key, value in bias.items():
            if isinstance(key, str) and re.fullmatch(r"\s*[+-]?\d{1,12}\s*", key):
                key = int(key)
            if not is_int(key) or not 0 <= key < self.n_vocab:
                raise ArgumentError(f"logit_bias: token ids are integers from 0 to {self.n_vocab - 1} (this "
                                    f"model's vocabulary), not {str(key)[:24]!r}")
            if not is_real(value):
                raise ArgumentError(f"logit_bias: the bias of token {key} must be a finite number, not {value!r}")

    def grammar(self, grammar) -> None:
        """Parse it with llama.cpp now: a grammar it refuses would be a NULL sampler, and a crash, later."""
        if grammar is None:
            return
        text, root = getattr(grammar, "_grammar", None), getattr(grammar, "_root", None)
        if not isinstance(text, str) or not isinstance(root, str):
            raise ArgumentError(f"grammar must be a llama_cpp.LlamaGrammar, not {type(grammar).__name__}")
        check_text("grammar", text)
        if len(text.encode("utf-8")) > MAX_GRAMMAR_BYTES:
            raise ArgumentError(f"the grammar is longer than {MAX_GRAMMAR_BYTES:,} bytes")
        if grammar_depth(text) > MAX_GRAMMAR_DEPTH:
            raise ArgumentError(f"the grammar nests parentheses deeper than {MAX_GRAMMAR_DEPTH} levels")
        sampler = lc.llama_sampler_init_grammar(self.vocab, text.encode("utf-8"), root.encode("utf-8"))
        if not sampler:
            raise ArgumentError("the grammar does not parse as GBNF (llama.cpp's parser printed why to the log)")
        lc.llama_sampler_free(sampler)

    def embedding(self, inputs) -> None:
        if not self.embeddings:
            raise ArgumentError("this model was loaded without embedding=True, so it gives no embeddings")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not inputs:
            raise ArgumentError("input must be a string or a non-empty list of strings")
        for text in inputs:
            check_text("input", text)
            if not text:
                raise ArgumentError("input holds an empty string: there is nothing to embed")

