"""Results over seeds, as the parity study reports them (run.py, pyreft_trainer.py and
sentiment_summary.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def mean_and_seeds(values: list[float], digits: int = 2) -> str:
    """``"0.755 (0.75, 0.76)"``: the mean (3 decimals) and each seed's value."""
    return f"{statistics.fmean(values):.3f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def plot_seed_band(ax, label: str, curves: list[list[float]]) -> None:
    """One line per step, the mean of ``curves`` (one per seed), with the seeds' range shaded."""
    by_step = list(zip(*curves, strict=True))
    steps = range(1, len(by_step) + 1)
    ax.plot(steps, [statistics.fmean(s) for s in by_step], label=label)
    ax.fill_between(steps, [min(s) for s in by_step], [max(s) for s in by_step], alpha=0.2)


def write_record(
    out: Path, results: dict, table: str, json_name="results.json", table_name="table.md"
) -> None:
    """A study's record in ``out`` (created): the results as JSON and the Markdown table, which
    is also printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / json_name).write_text(json.dumps(results, indent=1))
    (out / table_name).write_text(table + "\n")
    print(table)
