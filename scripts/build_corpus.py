"""Build the shipped real-text corpus (python/fastserve/data/corpus.txt).

The texts are English prose from the Python documentation's language and
library reference topics (the stdlib module pydoc_data.topics, PSF licence),
split into paragraphs and into their sentences, so lengths are mixed: short
sentences to long paragraphs. Deterministic: fixed filters, fixed shuffle.
Run: python scripts/build_corpus.py
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pydoc_data.topics as topics

OUT = Path(__file__).resolve().parents[1] / "python" / "fastserve" / "data" / "corpus.txt"


def prose(text: str) -> bool:
    return bool(re.match(r"^[A-Z\"']", text)) and sum(c.isalpha() or c == " " for c in text) / len(text) >= 0.85


def main() -> None:
    paragraphs: list[str] = []
    for _, body in sorted(topics.topics.items()):
        for p in re.split(r"\n\s*\n", body):
            p = " ".join(p.split())
            if 20 <= len(p) <= 1500 and prose(p):
                paragraphs.append(p)
    sentences = []
    for p in paragraphs:
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", p):
            if len(s.split()) >= 3 and prose(s):
                sentences.append(s)
    texts = sorted(set(paragraphs) | set(sentences))
    random.Random(20261125).shuffle(texts)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"{len(texts)} texts -> {OUT}")


if __name__ == "__main__":
    main()
