"""The project's user-facing failures: the CLI prints their message on one line and exits 2."""


class EdgeMoEError(Exception):
    """Base of every error a user can cause with their input."""


class BadModelError(EdgeMoEError):
    """The file is not a readable GGUF, is truncated, or points outside itself."""


class NotMoEError(EdgeMoEError):
    """The model has no expert tensors, so there is nothing to stream."""


class BudgetError(EdgeMoEError):
    """A memory budget that cannot be parsed or cannot hold what one layer needs."""


class MixedTypesError(EdgeMoEError):
    """A file with per-expert types met a llama-cpp-python built without edgemoe's patches."""
