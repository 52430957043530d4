"""The fixture is a trained model: greedy generation through the real llama.cpp (stock, in a child process:
tests/stock.py) reads like stdlib code.

Greedy with llama-cpp-python's usual repeat_penalty=1.1 (still deterministic argmax): without it, a model
this small falls into repeating one line, as greedy decoding of small models does."""
import io
import keyword
import re
import sysconfig
import tokenize
from pathlib import Path

import pytest
import stock

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PROMPTS = ["import os\nimport sys\n\n\ndef ", "class Parser:\n    def ", "    def __init__(self, "]


@pytest.fixture(scope="module")
def stdlib_words() -> set[str]:
    """The words (split at "_") of every identifier in the standard library's source."""
    words: set[str] = set()
    for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"):
        if "site-packages" not in p.parts:
            for ident in IDENT.findall(p.read_text(encoding="utf-8", errors="replace")):
                words.update(w for w in ident.split("_") if w)
    return words


def known(name: str, words: set[str]) -> bool:
    parts = [w for w in name.split("_") if w]
    return bool(parts) and all(w in words for w in parts)


def name_tokens(text: str) -> list[str]:
    out = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type == tokenize.NAME:
                out.append(t.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # generation stops mid-statement; the names seen so far count
    return out


@pytest.mark.stock
def test_greedy_generation_is_stdlib_like(fixture_path, stdlib_words):
    texts = stock.complete(fixture_path, PROMPTS, max_tokens=64, n_ctx=512, seed=0, repeat_penalty=1.1)
    n_known = total = structure = 0
    for prompt, text in zip(PROMPTS, texts, strict=True):
        names = name_tokens(prompt + text)[len(name_tokens(prompt)):]
        n_known += sum(known(n, stdlib_words) for n in names)
        structure += sum(keyword.iskeyword(n) or n == "self" for n in names)
        total += len(names)
    report = "\n---\n".join(texts)
    assert total >= 20, report
    assert n_known / total >= 0.9, report       # identifiers made of the stdlib's words
    assert structure >= 3, report               # and Python's structure (def, return, if, self...)
