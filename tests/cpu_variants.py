"""Runs a script in a child process whose CPU kernels are one forced variant.

The library picks its CPU kernels' build once per process (``reft_ext.cpu_kernels()``); the
environment variable ``REFT_EXT_CPU_KERNELS`` caps it. Tests of each variant therefore run in a
child process, and a variant this CPU cannot run is skipped with the reason (a machine without
AVX-512 still tests the variants it will use).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VARIANTS = ("portable", "avx2", "avx512")

# The /proc/cpuinfo flags each variant needs (what the library checks with cpuid).
_NEEDS = {
    "portable": set(),
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "fma"},
}


def cpu_flags() -> set[str]:
    """The flags of /proc/cpuinfo's first processor (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def best_variant() -> str:
    """The most capable variant the flags allow (x86-64 only; elsewhere portable)."""
    flags = cpu_flags() if os.uname().machine == "x86_64" else set()
    return [v for v in VARIANTS if _NEEDS[v] <= flags][-1]


def run_forced(variant: str, script: str, inputs, tmp_path: Path):
    """torch.load of what ``script`` saved at argv[2], run with ``inputs`` saved at argv[1] in a
    child process forced to ``variant`` (which it checks first). Skips where the CPU lacks it."""
    if VARIANTS.index(variant) > VARIANTS.index(best_variant()):
        pytest.skip(f"this CPU cannot run the {variant} kernels (best: {best_variant()})")
    torch.save(inputs, tmp_path / "inputs.pt")
    check = (
        f"import reft_ext; assert reft_ext.cpu_kernels() == {variant!r}, reft_ext.cpu_kernels()\n"
    )
    subprocess.run(
        [sys.executable, "-c", check + script, tmp_path / "inputs.pt", tmp_path / "out.pt"],
        env={**os.environ, "REFT_EXT_CPU_KERNELS": variant},
        check=True,
        timeout=120,
    )
    return torch.load(tmp_path / "out.pt")
