"""The project's user-facing failures: the CLI prints their message on one line and exits 2."""

EXIT_INTERRUPTED = 130          # a command stopped by SIGINT exits as shells report it: 128 + SIGINT


class EdgeMoEError(Exception):
    """Base of every error a user can cause with their input."""


class BadModelError(EdgeMoEError):
    """The file is not a readable GGUF, is truncated, or points outside itself."""


class ShardError(EdgeMoEError):
    """A model split over several files (NAME-00001-of-00003.gguf) whose shards are missing, misnamed or not of one
    split."""


class NotMoEError(EdgeMoEError):
    """The model has no expert tensors, so there is nothing to stream."""


class BudgetError(EdgeMoEError):
    """A memory budget that cannot be parsed or cannot hold what one layer needs."""


class MixedTypesError(EdgeMoEError):
    """A file with per-expert types met a llama-cpp-python built without edgemoe's patches."""


class ArgumentError(EdgeMoEError, ValueError):
    """An argument llama.cpp would crash on or misuse: a token id outside the vocabulary, a non-finite sampling
    value, a grammar that does not parse, a thread count of 0. The server answers it with 400, naming `param`
    (the request field at fault) when it is known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(ArgumentError):
    """The prompt does not fit the context window (llama-cpp-python's "Requested tokens (N) exceed context
    window of M", raised before a stream starts)."""


class LlamaClosedError(EdgeMoEError, RuntimeError):
    """A call on a Llama after close()."""


class LlamaBusyError(EdgeMoEError, RuntimeError):
    """A generation started on a Llama whose stream another thread has open (one generation at a time)."""


class NonFiniteError(EdgeMoEError):
    """llama.cpp computed logits that are not finite numbers: the file's weights are damaged."""


class APIKeyError(EdgeMoEError):
    """A request to `edgemoe serve` without the server's API key, or with another. The server answers it with
    401."""
