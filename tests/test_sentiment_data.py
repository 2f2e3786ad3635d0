"""The real-model demo's data pipeline (examples/sentiment/data.py) on a small hand-made CSV."""

import importlib.util
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "examples" / "sentiment" / "data.py"
_spec = importlib.util.spec_from_file_location("sentiment_data", DATA)
data = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = data  # dataclasses look their module up there
_spec.loader.exec_module(data)

ROWS = [
    b"positive,1,good flight",
    b"negative,1,\xe2\x80lost my bag",  # broken UTF-8: read as U+FFFD, dropped
    b"neutral,,no confidence given",  # blank confidence: dropped
    b"negative,0.5,not sure about this",  # below min_confidence: dropped
    b"sarcastic,1,unknown label",  # label outside LABELS: dropped
    b"neutral,1,twice",  # duplicated text, even with the same label: dropped
    b"neutral,1,twice",
    b"negative,0.95,delayed again",
    b'neutral,1,"a, quoted text"',
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_bytes(b"sentiment,confidence,text\n" + b"\n".join(ROWS) + b"\n")
    return path


def test_read_tweets_keeps_only_clean_confident_unique_rows(corpus):
    examples = data.read_tweets(corpus, min_confidence=0.9)
    assert examples == [
        data.Example("good flight", data.LABELS.index("positive")),
        data.Example("delayed again", data.LABELS.index("negative")),
        data.Example("a, quoted text", data.LABELS.index("neutral")),
    ]


def test_read_tweets_threshold_is_inclusive(corpus):
    texts = [e.text for e in data.read_tweets(corpus, min_confidence=0.5)]
    assert "not sure about this" in texts


def _pool(per_label, neutral=None):
    counts = [per_label, per_label if neutral is None else neutral, per_label]
    return [data.Example(f"{label}-{i}", label) for label in range(3) for i in range(counts[label])]


def test_split_is_balanced_disjoint_and_seeded():
    pool = _pool(20)
    splits = data.split(pool, {"train": 5, "test": 3}, seed=1)
    for name, count in (("train", 5), ("test", 3)):
        labels = [e.label for e in splits[name]]
        assert sorted(labels) == sorted([0, 1, 2] * count)
    assert not {e.text for e in splits["train"]} & {e.text for e in splits["test"]}
    assert data.split(pool, {"train": 5, "test": 3}, seed=1) == splits
    assert data.split(pool, {"train": 5, "test": 3}, seed=2) != splits


def test_split_names_the_short_label():
    with pytest.raises(ValueError, match="'neutral'"):
        data.split(_pool(20, neutral=15), {"train": 10, "test": 6})
