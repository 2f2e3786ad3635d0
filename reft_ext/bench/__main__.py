"""``python -m reft_ext.bench`` / ``reft-bench``: fused vs naive LoReFT on this device, as a table.

Where pyreft is importable the op table also times pyreft's own LoReFT module (provider
``pyreft``, see reft_ext.bench.cases); elsewhere that column is absent.

Writes ``results.json`` (machine info, every timing and each provider's peak memory), ``table.md``
and ``bench.png`` (speedup plot; needs matplotlib) into ``--out`` (default ``./reft-bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from .cases import (
    GRAD_SKIP_PROVIDERS,
    ROOFLINE,
    GradSkipCase,
    HookCase,
    OpCase,
    RetractionCase,
    TrainStepCase,
    grad_skip_call,
    hook_call,
    hook_cases,
    input_sets_for,
    make_inputs,
    op_cases,
    op_providers,
    provider_call,
    pyreft_version,
    retraction_call,
    retraction_cases,
    train_step_calls,
)
from .machine import machine_info
from .memory import peak_bytes
from .plot import save_plot
from .timing import Timing, time_interleaved

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


def measure(
    case: OpCase | GradSkipCase | RetractionCase | HookCase | TrainStepCase,
    calls: dict,
    device: torch.device,
    **timing,
) -> tuple[dict, dict[str, Timing]]:
    """Time ``calls`` interleaved, then take each one's peak memory in one more, untimed call.

    Returns the case's row (its fields, each provider's timing, ``peak_bytes`` per provider) and
    the timings. Memory comes after timing so lazily created workspaces (cuBLAS) already exist.
    """
    timings = time_interleaved(calls, device, **timing)
    row = case.as_dict() | {name: vars(t) for name, t in timings.items()}
    row["peak_bytes"] = {name: peak_bytes(fn, device) for name, fn in calls.items()}
    return row, timings


def format_mib(row: dict, providers: tuple[str, ...]) -> str:
    """``row``'s peak memory of ``providers`` in MiB, "a / b / c" ("-" where not measured)."""
    peaks = row["peak_bytes"]
    return " / ".join(f"{peaks[p] / 2**20:.1f}" if p in peaks else "-" for p in providers)


def baselines(providers) -> list[str]:
    """The providers compared with ``fused``: all but fused itself and the copy_ roofline."""
    return [p for p in providers if p not in ("fused", ROOFLINE)]


def run_case(case: OpCase, device: torch.device, repeats: int) -> dict:
    """Time the op providers (fused, naive, pyreft where importable, copy_) interleaved.

    Returns the row of the table: besides ``measure``'s fields, ``speedup_vs_<baseline>`` (its
    median ÷ fused's) per baseline and ``fused_over_copy``.
    """
    inputs = make_inputs(case, device, input_sets_for(case))
    providers = {p: provider_call(case, p, inputs) for p in op_providers()}
    row, timings = measure(case, providers, device, repeats=repeats)
    del inputs, providers
    for baseline in baselines(timings):
        row[f"speedup_vs_{baseline}"] = timings[baseline].median / timings["fused"].median
    row["fused_over_copy"] = timings["fused"].median / timings[ROOFLINE].median
    return row


def run_grad_skip_case(case: GradSkipCase, device: torch.device, repeats: int) -> dict:
    """Time forward+backward with every input needing a gradient against a frozen h and frozen
    parameters; ``<provider>_speedup`` = all's median ÷ the provider's."""
    calls = {p: grad_skip_call(case, p, device) for p in GRAD_SKIP_PROVIDERS}
    row, timings = measure(case, calls, device, repeats=repeats)
    for provider in list(GRAD_SKIP_PROVIDERS)[1:]:
        row[f"{provider}_speedup"] = timings["all"].median / timings[provider].median
    return row


def format_grad_skip_table(rows: list[dict]) -> str:
    head = (
        "| N | d | r | dtype | all grads ms | frozen h ms (speedup) | frozen params ms (speedup) "
        "| peak MiB (all / frozen h / frozen params) |"
    )
    lines = [head, "|" + "---|" * 8]
    for row in rows:
        ms = {p: row[p]["median"] * 1e3 for p in GRAD_SKIP_PROVIDERS}
        lines.append(
            f"| {row['N']} | {row['d']} | {row['r']} | {row['dtype']} | {ms['all']:.2f} | "
            f"{ms['frozen_h']:.2f} ({row['frozen_h_speedup']:.2f}x) | "
            f"{ms['frozen_params']:.2f} ({row['frozen_params_speedup']:.2f}x) | "
            f"{format_mib(row, tuple(GRAD_SKIP_PROVIDERS))} |"
        )
    return "\n".join(lines)


def run_retraction_case(case: RetractionCase, device: torch.device, repeats: int) -> dict:
    """Time the fused retraction against torch QR loops and (k = 1) pyreft's parametrization."""
    providers = ["fused", "torch_qr"] + (["parametrization"] if case.k == 1 else [])
    calls = {p: retraction_call(case, p, device) for p in providers}
    row, timings = measure(case, calls, device, repeats=repeats, warmup=2)
    for baseline in providers[1:]:
        row[f"{baseline}_over_fused"] = timings[baseline].median / timings["fused"].median
    return row


def format_retraction_table(rows: list[dict]) -> str:
    head = (
        "| k | d | r | fused ms | torch_qr ms | parametrization ms | qr/fused | param./fused "
        "| peak MiB (fused / torch_qr / param.) |"
    )
    lines = [head, "|" + "---|" * 9]
    for row in rows:
        param = row.get("parametrization")
        param_ms = f"{param['median'] * 1e3:.1f}" if param else "-"
        param_ratio = f"{row['parametrization_over_fused']:.0f}x" if param else "-"
        lines.append(
            f"| {row['k']} | {row['d']} | {row['r']} | {row['fused']['median'] * 1e3:.3f} | "
            f"{row['torch_qr']['median'] * 1e3:.3f} | {param_ms} | "
            f"{row['torch_qr_over_fused']:.1f}x | {param_ratio} | "
            f"{format_mib(row, ('fused', 'torch_qr', 'parametrization'))} |"
        )
    return "\n".join(lines)


def run_hook_case(case: HookCase, device: torch.device, repeats: int) -> dict:
    """Time the block alone, ReftModel's position-sparse hook and a clone-gather-scatter hook."""
    calls = {p: hook_call(case, p, device) for p in ("none", "reft_ext", "clone")}
    row, timings = measure(case, calls, device, repeats=repeats)
    for provider in ("reft_ext", "clone"):
        row[f"{provider}_overhead_ms"] = (timings[provider].median - timings["none"].median) * 1e3
    return row


def format_hook_table(rows: list[dict]) -> str:
    head = (
        "| B | T | P | d | block ms | +reft_ext ms | +clone ms | clone/reft_ext overhead "
        "| peak MiB (block / reft_ext / clone) |"
    )
    lines = [head, "|" + "---|" * 9]
    for row in rows:
        ours, theirs = row["reft_ext_overhead_ms"], row["clone_overhead_ms"]
        ratio = f"{theirs / ours:.1f}x" if ours > 0 else "-"
        lines.append(
            f"| {row['B']} | {row['T']} | {row['P']} | {row['d']} | "
            f"{row['none']['median'] * 1e3:.3f} | {ours:.3f} | {theirs:.3f} | {ratio} | "
            f"{format_mib(row, ('none', 'reft_ext', 'clone'))} |"
        )
    return "\n".join(lines)


def run_train_step(case: TrainStepCase, device: torch.device, repeats: int) -> dict:
    """Time a tiny Llama's training step: frozen, with reft_ext interventions, with naive ones."""
    row, timings = measure(case, train_step_calls(case, device), device, repeats=repeats)
    for provider in ("reft_ext", "naive"):
        row[f"{provider}_overhead"] = timings[provider].median / timings["frozen"].median - 1
    return row


def format_train_step(row: dict) -> str:
    ms = {p: row[p]["median"] * 1e3 for p in ("frozen", "reft_ext", "naive")}
    return (
        "| model | frozen ms | reft_ext ms (overhead) | naive hooks ms (overhead) "
        "| peak MiB (frozen / reft_ext / naive) |\n"
        "|---|---|---|---|---|\n"
        f"| Llama d={row['d']}, {row['layers']} layers, B={row['B']}, T={row['T']}, LoReFT r=4 at "
        f"2 layers f1+l1 | {ms['frozen']:.1f} | {ms['reft_ext']:.1f} "
        f"({100 * row['reft_ext_overhead']:+.1f} %) | {ms['naive']:.1f} "
        f"({100 * row['naive_overhead']:+.1f} %) | "
        f"{format_mib(row, ('frozen', 'reft_ext', 'naive'))} |"
    )


def format_table(rows: list[dict]) -> str:
    """The op table: a time column per provider measured in ``rows`` (``-`` where a row lacks it),
    then baseline ÷ fused per baseline, fused ÷ copy and the peak memories.

    Providers come from the rows (their ``peak_bytes``, in measuring order), so a saved run
    renders as it was measured; with no rows, the providers that always exist.
    """
    providers = list(dict.fromkeys(p for row in rows for p in row["peak_bytes"]))
    providers = providers or list(op_providers(optional=False))
    compared = baselines(providers)
    head = (
        "| mode | N | d | r | dtype | "
        + "".join(f"{p} ms | " for p in providers)
        + "".join(f"{p}/fused | " for p in compared)
        + f"fused/copy | peak MiB ({' / '.join(providers)}) |"
    )
    lines = [head, "|" + "---|" * (7 + len(providers) + len(compared))]
    ms = lambda t: f"{t['median'] * 1e3:.3f}" if t else "-"  # noqa: E731
    ratio = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['N']} | {row['d']} | {row['r']} | {row['dtype']} | "
            + "".join(f"{ms(row.get(p))} | " for p in providers)
            + "".join(f"{ratio(row.get(f'speedup_vs_{p}'))} | " for p in compared)
            + f"{row['fused_over_copy']:.2f} | {format_mib(row, tuple(providers))} |"
        )
    return "\n".join(lines)


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

    def selected(cases: list) -> list:
        return [c for c in cases if not args.only or any(t in c.name for t in args.only)]

    rows = []
    for case in selected(op_cases(args.quick)):
        rows.append(run_case(case, device, repeats))
        r = rows[-1]
        compared = ", ".join(
            f"{p} {r[p]['median'] * 1e3:.3f} ms ({r[f'speedup_vs_{p}']:.2f}x)"
            for p in baselines(r["peak_bytes"])
        )
        print(f"  {case.name}: fused {r['fused']['median'] * 1e3:.3f} ms, {compared}", flush=True)
    grad_skip_rows = []
    for case in selected([GradSkipCase()]):
        grad_skip_rows.append(run_grad_skip_case(case, device, repeats))
        r = grad_skip_rows[-1]
        print(
            f"  {case.name}: frozen h {r['frozen_h_speedup']:.2f}x, "
            f"frozen params {r['frozen_params_speedup']:.2f}x",
            flush=True,
        )
    retraction_rows = []
    for case in selected(retraction_cases(args.quick)):
        retraction_rows.append(run_retraction_case(case, device, max(5, repeats // 2)))
        print(
            f"  {case.name}: fused {retraction_rows[-1]['fused']['median'] * 1e3:.3f} ms",
            flush=True,
        )
    hook_rows = []
    for case in selected(hook_cases(args.quick)):
        hook_rows.append(run_hook_case(case, device, repeats))
        print(f"  {case.name}: +{hook_rows[-1]['reft_ext_overhead_ms']:.3f} ms", flush=True)
    train_row = None
    for case in selected([TrainStepCase()]):
        try:
            train_row = run_train_step(case, device, repeats)
        except ImportError:  # transformers is optional
            print("  train step: skipped (transformers not installed)")
    tables = [format_table(rows), format_grad_skip_table(grad_skip_rows)]
    tables += [format_retraction_table(retraction_rows)]
    tables += [format_hook_table(hook_rows)] + ([format_train_step(train_row)] if train_row else [])
    table = "\n\n".join(tables)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": info,
        "ops": rows,
        "grad_skip": grad_skip_rows,
        "retraction": retraction_rows,
        "hook": hook_rows,
        "train_step": train_row,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(table + "\n")
    written = ["results.json", "table.md"] + (
        ["bench.png"] if save_plot(results, args.out / "bench.png") else []
    )
    print(f"wrote {', '.join(written)} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
