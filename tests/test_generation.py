"""The fixture is a trained model: greedy generation through the real llama.cpp reads like stdlib code."""
import io
import keyword
import sysconfig
import tokenize
from pathlib import Path

import pytest
from llama_cpp import Llama

PROMPTS = ["import os\nimport sys\n\n\ndef ", "class ", "    def __init__(self, "]


@pytest.fixture(scope="module")
def stdlib_names() -> set[str]:
    """Identifiers the standard library's top-level modules use."""
    names: set[str] = set()
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            toks = tokenize.generate_tokens(io.StringIO(p.read_text(encoding="utf-8")).readline)
            names.update(t.string for t in toks if t.type == tokenize.NAME)
        except (SyntaxError, tokenize.TokenError, UnicodeDecodeError):
            continue
    return names


def name_tokens(text: str) -> list[str]:
    out = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type == tokenize.NAME:
                out.append(t.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # generation stops mid-statement; the names seen so far count
    return out


def test_greedy_generation_is_stdlib_like(fixture_path, stdlib_names):
    llm = Llama(model_path=str(fixture_path), n_ctx=512, verbose=False, seed=0)
    known = total = keywords = 0
    texts = []
    for prompt in PROMPTS:
        text = llm.create_completion(prompt, max_tokens=64, temperature=0.0)["choices"][0]["text"]
        texts.append(text)
        names = name_tokens(prompt + text)[len(name_tokens(prompt)):]
        known += sum(n in stdlib_names for n in names)
        keywords += sum(keyword.iskeyword(n) for n in names)
        total += len(names)
    llm.close()
    report = "\n---\n".join(texts)
    assert total >= 20, report
    assert known / total >= 0.85, report        # identifiers the stdlib really uses
    assert keywords >= 3, report                # and Python's structure (def, return, if, self...)
