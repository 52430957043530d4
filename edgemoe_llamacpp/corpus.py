"""Default calibration and held-out text: the running interpreter's standard library, split by file.

The bundled model (tests/fixtures/tiny-moe.gguf) was trained on the train split; the validation split is
the files whose path hashes below VAL_PERCENT, so every machine rebuilds the same split from its own
Python (the exact text varies a little between Python versions).
"""
from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from edgemoe_llamacpp.errors import EdgeMoEError

VAL_PERCENT = 5
EOT = "<|endoftext|>"


def stdlib_files() -> list[tuple[str, Path]]:
    """Every .py file of the running interpreter's Lib/ (no site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        out.append((rel, p))
    return sorted(out)


def is_validation(rel: str, val_percent: int = VAL_PERCENT) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < val_percent


def split_texts(split: str) -> Iterator[str]:
    """The text of every file of one split ("train" or "validation"), in path order."""
    if split not in ("train", "validation"):
        raise ValueError(f"split is 'train' or 'validation', not {split!r}")
    for rel, p in stdlib_files():
        if is_validation(rel) != (split == "validation"):
            continue
        try:
            yield p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def tokens(llm, texts, limit: int) -> list[int]:
    """Token ids of `texts` through the model's own tokenizer, documents joined by its end-of-text token."""
    eot = llm.tokenize(EOT.encode(), add_bos=False, special=True)
    out: list[int] = []
    for text in texts:
        out += llm.tokenize(text.encode(), add_bos=False, special=False) + eot
        if len(out) >= limit:
            break
    return out[:limit]


def windows(ids: list[int], n_ctx: int) -> list[list[int]]:
    """`ids` cut into whole, independent windows of n_ctx tokens (the tail shorter than one is left out)."""
    out = [ids[s:s + n_ctx] for s in range(0, len(ids) - n_ctx + 1, n_ctx)]
    if not out:
        raise EdgeMoEError(f"the text gives {len(ids)} tokens, fewer than one window of {n_ctx}")
    return out


def read_texts(paths) -> list[str]:
    """The text of each file. A file that is not UTF-8 text with something in it (missing, a directory, no
    permission, binary, empty) is an EdgeMoEError: scoring or calibrating on it would measure nothing useful."""
    from edgemoe_llamacpp.files import read_bytes

    texts = []
    for path in paths:
        data = read_bytes(path, "text file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EdgeMoEError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None
        if "\0" in text:
            raise EdgeMoEError(f"{path}: not text (a NUL byte at offset {data.index(0)})")
        if not text.strip():
            raise EdgeMoEError(f"{path}: the text file is {'empty' if not data else 'only whitespace'}")
        texts.append(text)
    return texts


def prompt_of(llm, n_tokens: int, texts) -> str:
    """A prefix of `texts` (joined) that the model's tokenizer makes exactly `n_tokens` tokens, BOS included, as
    a completion counts its prompt. Token counts grow with the prefix but not always one by one (a
    character may be several tokens, or merge into the one before): the search finds where the count first
    reaches `n_tokens`, then looks nearby for a prefix of exactly that many."""
    def count(k: int) -> int:
        return len(llm.tokenize(text[:k].encode()))

    text = ""
    for t in texts:
        text += t
        if len(text) >= 8 * n_tokens and count(len(text)) > n_tokens:
            break
    lo, hi = 0, len(text)
    if count(hi) < n_tokens:
        raise EdgeMoEError(f"the text gives {count(hi)} tokens, fewer than the {n_tokens} asked for")
    while lo < hi:              # the first prefix of at least n_tokens
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < n_tokens else (lo, mid)
    for k in sorted(range(max(1, lo - 32), min(len(text), lo + 32) + 1), key=lambda k: abs(k - lo)):
        if count(k) == n_tokens:
            return text[:k]
    raise EdgeMoEError(f"no prefix of the text is exactly {n_tokens} tokens")
