"""Task (b) of the parity study: the SmolLM2-135M sentiment demo with each LoReFT variant, over
seeds, summarized from the demo's own result folders.

Run the demo once per seed with the four variants (each starts from its seed's initial weights,
data split and order), then summarize:

    for seed in 0 1 2; do
      python examples/sentiment/run.py --seed $seed --validate-every 94 --out parity/seed$seed \\
          --methods loreft-parametrization loreft-householder loreft loreft-riemannian
    done
    python examples/pyreft_parity/sentiment_summary.py parity/seed0 parity/seed1 parity/seed2 \\
        --out parity

writes ``sentiment.json`` (per variant and seed: test accuracy, losses), ``sentiment.md`` (the
table) and ``sentiment.png`` (training loss per step, mean over seeds, the seeds' range shaded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sentiment"))

from report import moving_average  # noqa: E402
from seeds import mean_and_seeds, plot_seed_band, write_record  # noqa: E402

from reft_ext.bench.plot import agg_figure  # noqa: E402
from reft_ext.bench.table import markdown_table  # noqa: E402


def collect(folders: list[Path]) -> dict[str, list[dict]]:
    """{method: [one record per seed: seed, test accuracy, losses, median step]}."""
    by_method: dict[str, list[dict]] = {}
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        seed = results["data"]["seed"]
        for run in results["methods"]:
            record = {"seed": seed, "test_accuracy": run["test_accuracy"], "losses": run["losses"],
                      "median_step_seconds": run["median_step_seconds"]}  # fmt: skip
            by_method.setdefault(run["settings"].get("method", run["name"]), []).append(record)
    return by_method


def table(by_method: dict[str, list[dict]]) -> str:
    """Per method: test accuracy (mean and per seed), mean loss over the last 20 steps."""
    rows = []
    for method, runs in by_method.items():
        accuracy = [r["test_accuracy"] for r in runs]
        tail = [statistics.fmean(r["losses"][-20:]) for r in runs]
        rows.append([
            method,
            mean_and_seeds(accuracy, digits=3),
            mean_and_seeds(tail, digits=3),
        ])  # fmt: skip
    header = ["method", "test accuracy: mean (per seed)", "train loss, last 20 steps: mean"]
    return markdown_table(header, rows)


def plot(by_method: dict[str, list[dict]], path: Path) -> bool:
    fig = agg_figure(path, figsize=(7, 4), layout="constrained")
    if fig is None:
        return False
    ax = fig.subplots()
    for method, runs in by_method.items():
        plot_seed_band(ax, method, [moving_average(r["losses"], 10) for r in runs])
    ax.set(xlabel="step", ylabel="training loss (moving average of 10)",
           title="SmolLM2-135M sentiment: LoReFT variants")  # fmt: skip
    ax.legend()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="the demo's --out folders")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    by_method = collect(args.folders)
    write_record(args.out, by_method, table(by_method), "sentiment.json", "sentiment.md")
    plot(by_method, args.out / "sentiment.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
