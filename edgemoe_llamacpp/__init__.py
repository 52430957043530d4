"""edgemoe-llamacpp: Mixture-of-Experts GGUFs larger than RAM in llama-cpp-python, experts streamed from storage."""
from .errors import BadModelError, BudgetError, EdgeMoEError, NotMoEError
from .layout import MoELayout, read_layout

__version__ = "0.1.0"
__all__ = ["BadModelError", "BudgetError", "EdgeMoEError", "MoELayout", "NotMoEError", "read_layout"]
