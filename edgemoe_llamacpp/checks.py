"""Value checks shared by the argument and option checkers (no llama_cpp import: the CLI builds its parser
before any runtime is installed)."""
from __future__ import annotations

import math

import numpy as np


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)
