"""Results over seeds, as the parity study reports them (run.py and sentiment_summary.py)."""

from __future__ import annotations

import statistics


def mean_and_seeds(values: list[float], digits: int = 2) -> str:
    """``"0.755 (0.75, 0.76)"``: the mean (3 decimals) and each seed's value."""
    return f"{statistics.fmean(values):.3f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def plot_seed_band(ax, label: str, curves: list[list[float]]) -> None:
    """One line per step, the mean of ``curves`` (one per seed), with the seeds' range shaded."""
    by_step = list(zip(*curves, strict=True))
    steps = range(1, len(by_step) + 1)
    ax.plot(steps, [statistics.fmean(s) for s in by_step], label=label)
    ax.fill_between(steps, [min(s) for s in by_step], [max(s) for s in by_step], alpha=0.2)
