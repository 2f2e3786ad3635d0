"""The benchmark's PNG: fused-vs-naive speedup against N and, on CUDA, the copy-bandwidth fraction.

Re-render from a saved run with ``python -m reft_ext.bench.plot results.json [out.png]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .record import Measurement, group_by_case, load_results

MODE_TITLES = {"forward": "forward", "forward_backward": "forward+backward"}
DTYPE_STYLES = {"float32": "-", "bfloat16": "--", "float16": ":"}


def _op_rows(measurements: list[Measurement]) -> list[dict]:
    """The op suite's cases as their parameters plus ``medians`` ({provider: seconds})."""
    return [
        params | {"medians": {p: m.value for p, m in by_provider.items()}}
        for params, by_provider in group_by_case(measurements, "op")
    ]


def _groups(rows: list[dict], mode: str) -> dict[tuple, list[dict]]:
    """Rows of ``mode`` keyed by (d, r, dtype), each list sorted by N."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["mode"] == mode:
            groups.setdefault((row["d"], row["r"], row["dtype"]), []).append(row)
    return {key: sorted(group, key=lambda row: row["N"]) for key, group in sorted(groups.items())}


def _ratio(numerator: str, denominator: str):
    return lambda row: row["medians"][numerator] / row["medians"][denominator]


def _draw(ax, groups: dict[tuple, list[dict]], value, colors: dict) -> None:
    for (d, r, dtype), group in groups.items():
        ax.plot(
            [row["N"] for row in group],
            [value(row) for row in group],
            DTYPE_STYLES.get(dtype, "-."),
            color=colors[(d, r)],
            marker="o",
            label=f"d={d} r={r} {dtype}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (rows of h)")
    ax.grid(True, alpha=0.3)


def agg_figure(path: str | Path, **figure_kwargs):
    """A matplotlib ``Figure`` on the Agg canvas, for writing ``path``; None when matplotlib is
    not installed, after printing a one-line note that ``path`` was skipped.

    Figure + the Agg canvas directly: no pyplot, so no GUI backend and no global state.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"{path} skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    fig = Figure(**figure_kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_plot(machine: dict, measurements: list[Measurement], path: str | Path) -> bool:
    """Write the PNG of a run (``machine`` info and its measurements, as in ``results.json``).

    Panels: speedup (naive median ÷ fused median) against N for the forward and the
    forward+backward op cases, one line per (d, r, dtype); when ``machine["device"]`` is CUDA,
    also the fraction of the measured ``copy_`` bandwidth the fused forward reaches (copy median ÷
    fused median; 1 = at the memory roofline). Returns False, after printing a one-line note, when
    matplotlib is not installed; the benchmark's other files do not need it.
    """
    rows = _op_rows(measurements)
    on_cuda = str(machine["device"]).startswith("cuda")
    fig = agg_figure(path, figsize=(6 * (2 + on_cuda), 4.8), layout="constrained")
    if fig is None:
        return False
    keys = sorted({(row["d"], row["r"]) for row in rows})
    colors = {key: f"C{i % 10}" for i, key in enumerate(keys)}

    axes = fig.subplots(1, 2 + on_cuda, squeeze=False)[0]
    for ax, mode in zip(axes, MODE_TITLES, strict=False):
        _draw(ax, _groups(rows, mode), _ratio("naive", "fused"), colors)
        ax.axhline(1.0, color="gray", linewidth=1)
        ax.set_ylabel("speedup over naive (×)")
        ax.set_title(f"fused vs naive, {MODE_TITLES[mode]}")
    if on_cuda:
        ax = axes[2]
        _draw(ax, _groups(rows, "forward"), _ratio("copy", "fused"), colors)
        ax.axhline(
            0.8, color="gray", linestyle="--", linewidth=1
        )  # the target: within 80 % of copy_'s bandwidth
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("copy time ÷ fused time (dashed: 0.8)")
        ax.set_title("fused forward, fraction of copy_ bandwidth")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize="small")
    fig.suptitle(
        f"reft_ext bench: {machine.get('gpu') or machine.get('cpu')}, "
        f"{machine.get('threads')} threads, torch {machine.get('torch')}, {machine.get('date')}",
        fontsize="medium",
    )
    fig.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reft_ext.bench.plot", description="Re-render bench.png from results.json."
    )
    parser.add_argument(
        "results", type=Path, help="results.json written by python -m reft_ext.bench"
    )
    parser.add_argument("out", type=Path, nargs="?", help="PNG path (default: bench.png beside it)")
    args = parser.parse_args(argv)
    out = args.out or args.results.with_name("bench.png")
    if save_plot(*load_results(args.results), out):
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
