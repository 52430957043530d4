"""`SafeLlama`: llama-cpp-python's Llama made safe to share and to call with anything: one call at a time, closed
for good after close(), and arguments llama.cpp would crash on refused before anything runs. `Llama` (engine.llama)
builds on it; nothing here knows of experts."""
from __future__ import annotations

import contextlib
import functools

import jinja2
import llama_cpp

from edgemoe_llamacpp.engine.arguments import (
    ArgumentChecks,
    bind,
    check_context,
    check_sample_position,
    context_errors,
    is_int,
)
from edgemoe_llamacpp.engine.guard import CallGuard, Stream, serialised
from edgemoe_llamacpp.engine.interrupt import sigint_deferred
from edgemoe_llamacpp.engine.sampling import sample_within_grammar
from edgemoe_llamacpp.errors import ArgumentError, EdgeMoEError


class SafeLlama(llama_cpp.Llama):
    """A `llama_cpp.Llama` that is safe to share: calls on one instance are serialised by a lock (a stream takes
    it for each step), a call after close() raises LlamaClosedError, and arguments llama.cpp would crash on
    (token ids outside the vocabulary, a grammar that does not parse, non-finite sampling values, an empty
    prompt) raise ArgumentError, a ValueError, before anything runs; a streamed completion checks its prompt
    against the context window when it is created, not at its first chunk.

    A subclass hears of evaluations through `_evaluating` (the context of each llama_decode), `_evaluated`,
    `_sampled`, `_new_sequence`, and of close() through `_closing` and `_closed`."""

    def __init__(self, *args, **kwargs):
        self._guarded()
        super().__init__(*args, **kwargs)
        self._checks_ready()

    def _guarded(self) -> None:
        """The guard's state, first of all (a subclass that reads files before loading calls it sooner)."""
        if "_edgemoe_guard" in self.__dict__:
            return
        self._edgemoe_guard = CallGuard()        # one call at a time; closed; the open stream
        self._edgemoe_formatting = False         # a chat handler is formatting messages, no completion yet
        self._edgemoe_logits: tuple[int, int] | None = None   # token positions whose logits sample() may use

    def _checks_ready(self) -> None:
        # llama.cpp pads the context (to 256 tokens); llama-cpp-python takes the padded size as its window
        # but sizes its token buffer by the n_ctx asked for, and a prompt between the two overran that
        # buffer (ValueError deep in eval). The window is what the buffer holds.
        self._n_ctx = min(self._n_ctx, len(self.input_ids))
        self._edgemoe_checks = ArgumentChecks(n_vocab=self._n_vocab, vocab=self._model.vocab,
                                              logits_all=self._logits_all,
                                              embeddings=bool(self.context_params.embeddings))

    # what a subclass hears of: the context of each llama_decode; tokens evaluated, a token sampled, a new prompt;
    # before llama.cpp frees the model (what uses it goes first), and after
    _evaluating = staticmethod(contextlib.nullcontext)
    _evaluated = _sampled = _new_sequence = _closing = _closed = lambda self, *args: None

    # ------------------------------------------------------------------ one call at a time
    def _edgemoe_call(self, generation: bool = False):
        """The guard's `call`: the instance lock for one call; yields True for the outermost call."""
        return self._edgemoe_guard.call(generation)

    def _open_stream(self, gen) -> Stream:
        with context_errors():
            return self._edgemoe_guard.open_stream(gen)

    # ------------------------------------------------------------------ generation
    def create_completion(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            self._edgemoe_formatting = False       # a chat handler got this far: its messages are formatted
            call = bind(llama_cpp.Llama.create_completion, self, args, kwargs)
            self._edgemoe_checks.completion(call)
            with context_errors():
                result = super().create_completion(**call)
            return self._open_stream(result) if call["stream"] and outer else result

    def __call__(self, *args, **kwargs):
        return self.create_completion(*args, **kwargs)

    def create_chat_completion(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            call = bind(llama_cpp.Llama.create_chat_completion, self, args, kwargs)
            if not isinstance(call["messages"], list):
                raise ArgumentError("messages must be a list")
            if call["logprobs"]:
                self._edgemoe_checks.logprobs("top_logprobs", call["top_logprobs"])
            self._edgemoe_formatting = True
            try:
                result = super().create_chat_completion(**call)
            except (ValueError, TypeError, LookupError, AttributeError, jinja2.TemplateError) as e:
                if not self._edgemoe_formatting or isinstance(e, EdgeMoEError):
                    raise
                raise ArgumentError(f"these messages do not fit the model's chat format ({type(e).__name__}: "
                                    f"{str(e)[:200]})") from e
            finally:
                self._edgemoe_formatting = False
            return self._open_stream(result) if call["stream"] and outer else result

    def generate(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if not outer:
                return super().generate(*args, **kwargs)
            call = bind(llama_cpp.Llama.generate, self, args, kwargs)
            tokens = call["tokens"]
            self._edgemoe_checks.tokens(tokens, "tokens")
            if len(tokens) == 0 and self.n_tokens == 0:
                raise ArgumentError("generate() needs at least one token to start from")
            check_context(len(tokens), self._n_ctx)
            self._edgemoe_checks.sampling(call, llama_cpp.Llama.generate)
            return self._edgemoe_guard.open_stream(super().generate(**call), prime=False)

    def create_embedding(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                self._edgemoe_checks.embedding(bind(llama_cpp.Llama.create_embedding, self, args, kwargs)["input"])
            with self._evaluating():
                return super().create_embedding(*args, **kwargs)

    def embed(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                self._edgemoe_checks.embedding(bind(llama_cpp.Llama.embed, self, args, kwargs)["input"])
            with self._evaluating():
                return super().embed(*args, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def eval(self, tokens) -> None:
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                self._edgemoe_checks.tokens(tokens, "tokens")
                check_context(self.n_tokens + len(tokens), self._n_ctx)
            before = self.n_tokens
            try:
                with self._evaluating():
                    super().eval(tokens)
            except BaseException:
                # interrupted or failed part-way: the tokens' cache entries are incomplete; the next eval
                # overwrites them (llama-cpp-python clears the cache from n_tokens on)
                self.n_tokens, self._edgemoe_logits = before, None
                raise
            if len(tokens):
                last = len(tokens) % self.n_batch or self.n_batch   # llama.cpp keeps the last batch's logits
                self._edgemoe_logits = (self.n_tokens - (last if self._logits_all else 1), self.n_tokens)
            self._evaluated(tokens)

    def sample(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                call = bind(llama_cpp.Llama.sample, self, args, kwargs)
                self._edgemoe_checks.sampling(call, llama_cpp.Llama.sample)
                check_sample_position(call["idx"], self._edgemoe_logits)
                args, kwargs = (), call
            token = super().sample(*args, **kwargs)
            self._sampled(token)
            return token

    def _init_sampler(self, *args, **kwargs):
        sampler = super()._init_sampler(*args, **kwargs)
        if kwargs.get("grammar") is not None:
            sampler.sample = functools.partial(sample_within_grammar, sampler, n_vocab=self._n_vocab,
                                               eos=self._token_eos)
        return sampler

    def reset(self) -> None:
        with self._edgemoe_call(generation=True):
            super().reset()
            self._edgemoe_logits = None
            self._new_sequence()

    def load_state(self, state) -> None:
        with self._edgemoe_call(generation=True):
            super().load_state(state)
            self._edgemoe_logits = None

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        with self._edgemoe_call() as outer:
            if outer and not isinstance(text, bytes):
                raise ArgumentError(f"tokenize() takes UTF-8 bytes, not {type(text).__name__}")
            return super().tokenize(text, add_bos, special)

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        with self._edgemoe_call() as outer:
            if outer:            # llama.cpp aborts the process on an id outside the vocabulary
                self._edgemoe_checks.tokens(tokens, "tokens")
                if prev_tokens is not None:
                    self._edgemoe_checks.tokens(prev_tokens, "prev_tokens")
            return super().detokenize(tokens, prev_tokens, special)

    def set_seed(self, seed: int) -> None:
        with self._edgemoe_call():
            if not is_int(seed):
                raise ArgumentError(f"seed must be an integer, not {seed!r}")
            super().set_seed(seed)

    save_state = serialised(llama_cpp.Llama.save_state)
    set_cache = serialised(llama_cpp.Llama.set_cache)
    n_ctx = serialised(llama_cpp.Llama.n_ctx)
    n_embd = serialised(llama_cpp.Llama.n_embd)
    n_vocab = serialised(llama_cpp.Llama.n_vocab)
    tokenizer = serialised(llama_cpp.Llama.tokenizer)
    token_eos = serialised(llama_cpp.Llama.token_eos)
    token_bos = serialised(llama_cpp.Llama.token_bos)
    token_nl = serialised(llama_cpp.Llama.token_nl)
    pooling_type = serialised(llama_cpp.Llama.pooling_type)

    def close(self) -> None:
        """Free the model; waits for a call in progress. Later calls raise LlamaClosedError."""
        guard = self.__dict__.get("_edgemoe_guard")
        with guard.closing() if guard is not None else contextlib.nullcontext(True) as first:
            if not first:
                return
            self._closing()
            if hasattr(self, "_stack"):       # absent when a bad file or budget stopped __init__ early
                with sigint_deferred(lambda: None):     # llama.cpp logs as it frees: raised once it is done
                    super().close()
            self._closed()
