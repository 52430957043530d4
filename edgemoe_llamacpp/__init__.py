"""edgemoe-llamacpp: Mixture-of-Experts GGUFs larger than RAM in llama-cpp-python, experts streamed from storage."""
from edgemoe_llamacpp.errors import BadModelError, BudgetError, EdgeMoEError, NotMoEError
from edgemoe_llamacpp.gguf.layout import MoELayout, read_layout

__version__ = "0.1.0"
__all__ = ["BadModelError", "BudgetError", "EdgeMoEError", "Llama", "MoELayout", "NotMoEError", "read_layout"]


def __getattr__(name: str):
    if name == "Llama":          # imported on first use: llama_cpp loads native libraries
        try:
            from edgemoe_llamacpp.engine.llama import Llama
        except ModuleNotFoundError as e:
            if e.name != "llama_cpp":
                raise
            raise ModuleNotFoundError("llama-cpp-python is not installed; build edgemoe's runtime into this "
                                      "environment: edgemoe build-runtime", name="llama_cpp") from None
        return Llama
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
