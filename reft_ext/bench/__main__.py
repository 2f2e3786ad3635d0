"""``python -m reft_ext.bench`` / ``reft-bench``: fused vs naive LoReFT on this device, as a table.

Where pyreft is importable the op table also times pyreft's own LoReFT module (provider
``pyreft``, see reft_ext.bench.cases); elsewhere that column is absent.

Writes ``results.json`` (machine info and every measurement: one row per case and provider with
median, quartiles, sample count and peak memory; reft_ext.bench.record), ``table.md`` (one table
per suite, views of those rows) and ``bench.png`` (speedup plot; needs matplotlib) into ``--out``
(default ``./reft-bench``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from .cases import SUITES, pyreft_version
from .machine import machine_info
from .memory import peak_bytes
from .plot import save_plot
from .record import Case, Measurement, save_results
from .table import format_column, format_ms, suite_table
from .timing import time_interleaved

# glibc returns large freed blocks to the OS, so every fresh N×d tensor page-faults again (tens of
# ms per 64 MiB here), which would swamp the kernels being compared. Keeping freed memory in the
# process, as PyTorch's CUDA caching allocator does on GPU, measures the ops themselves; it helps
# the naive provider most, since it allocates the most.
MALLOC_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 34),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def _reexec_with_malloc_settings() -> None:
    if platform.system() != "Linux" or all(os.environ.get(k) for k in MALLOC_SETTINGS):
        return
    env = {**os.environ, **MALLOC_SETTINGS}
    os.execve(sys.executable, [sys.executable, "-m", "reft_ext.bench", *sys.argv[1:]], env)


def run_info(device: torch.device) -> dict:
    """machine_info plus what this benchmark depends on: malloc settings, pyreft's version."""
    return {
        **machine_info(device),
        "malloc_settings": {k: os.environ.get(k) for k in MALLOC_SETTINGS},
        "pyreft": pyreft_version(),  # None: pyreft not importable, no ``pyreft`` provider
    }


def measure(case: Case, device: torch.device, repeats: int) -> list[Measurement]:
    """Time ``case``'s providers interleaved, then take each one's peak memory in one more,
    untimed call; one Measurement per provider.

    Memory comes after timing so lazily created workspaces (cuBLAS) already exist.
    """
    calls = case.calls(device)
    timings = time_interleaved(calls, device, **case.timing(repeats))
    return [
        Measurement(
            suite=case.suite,
            case=case.name,
            params=case.params,
            provider=provider,
            metric="time",
            unit="s",
            value=t.median,
            q1=t.q1,
            q3=t.q3,
            samples=t.samples,
            peak_bytes=peak_bytes(calls[provider], device),
        )
        for provider, t in timings.items()
    ]


def summary(case: Case, measurements: list[Measurement]) -> str:
    """One progress line: each provider's median, then the derived columns it has."""
    medians = {m.provider: m.value for m in measurements}
    parts = [f"{p} {format_ms(v)} ms" for p, v in medians.items()]
    shown = [c for c in case.columns if all(p in medians for p in c.providers)]
    parts += [f"{c.label} {format_column(c, medians)}" for c in shown]
    return f"  {case.name}: " + ", ".join(parts)


def format_tables(measurements: list[Measurement]) -> str:
    """Every suite's table that has measurements, each under its title."""
    tables = ((s.title, suite_table(measurements, s.suite, s.columns)) for s in SUITES)
    return "\n\n".join(f"{title}\n\n{table}" for title, table in tables if table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reft-bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="headline shapes only (~1 min on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1; 0 keeps torch's default)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="samples per provider")
    parser.add_argument("--out", type=Path, default=Path("reft-bench"), help="output folder")
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only the cases whose name contains TEXT (repeatable), e.g. N256 or hook-",
    )
    args = parser.parse_args(argv)
    if argv is None:
        _reexec_with_malloc_settings()

    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = args.repeats or (11 if args.quick else 21)
    info = run_info(device)
    print(
        f"reft_ext benchmark on {info['gpu'] or info['cpu']} ({info['threads']} threads), "
        f"torch {info['torch']}" + (f", pyreft {info['pyreft']}" if info["pyreft"] else ""),
        flush=True,
    )

    measurements: list[Measurement] = []
    for suite in SUITES:
        for case in suite.grid(args.quick):
            if args.only and not any(text in case.name for text in args.only):
                continue
            try:
                measured = measure(case, device, repeats)
            except ImportError as error:  # an optional dependency (transformers)
                print(f"  {case.name}: skipped ({error})", flush=True)
                continue
            measurements += measured
            print(summary(case, measured), flush=True)
    table = format_tables(measurements)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    save_results(args.out / "results.json", info, measurements)
    (args.out / "table.md").write_text(table + "\n")
    written = ["results.json", "table.md"] + (
        ["bench.png"] if save_plot(info, measurements, args.out / "bench.png") else []
    )
    print(f"wrote {', '.join(written)} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
