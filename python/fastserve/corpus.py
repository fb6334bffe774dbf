"""The shipped real-text corpus: English prose of mixed length (a few words
to a few hundred tokens), built by scripts/build_corpus.py. No downloads."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"


@lru_cache(maxsize=1)
def texts() -> tuple[str, ...]:
    return tuple(line for line in PATH.read_text(encoding="utf-8").splitlines() if line)
