"""Static report of every CUDA kernel in csrc/cuda, from the compiler alone (no GPU needed).

Compiles each .cu file for the given architectures with the flags of the real build (torch's
nvcc flags, -O3) and ``-Xptxas -v``, and reads per kernel and architecture: registers, stack frame,
spill stores and loads, static shared memory, and, from the PTX that nvcc keeps, the number of
16-byte global loads and stores (``ld.global[.nc].v4`` / ``st.global.v4``: whether the vectorized
path really is vectorized).

    python tools/kernel_report.py                 # Markdown table, sm_80 and sm_90
    python tools/kernel_report.py --json out.json --archs 90

tests/test_kernel_report.py runs it and fails if any kernel spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
DEFAULT_ARCHS = ("80", "90")


@dataclass
class KernelUsage:
    """Resources of one kernel on one architecture, as ptxas reports them."""

    file: str
    kernel: str  # demangled, namespaces dropped
    arch: str  # "sm_80"
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    v4_loads: int
    v4_stores: int


def nvcc() -> str:
    """The nvcc to use: $CUDA_HOME/bin/nvcc, else the one on PATH (a wrapper script is fine)."""
    home = os.environ.get("CUDA_HOME")
    path = Path(home) / "bin" / "nvcc" if home else shutil.which("nvcc")
    if not path or not Path(path).exists():
        raise FileNotFoundError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    return str(path)


def _compile_flags(archs) -> list[str]:
    import torch.utils.cpp_extension as cpp_extension

    flags = ["-std=c++20", "-O3", "-fatbin", "-Xptxas", "-v", "--keep"]
    flags += list(cpp_extension.COMMON_NVCC_FLAGS)
    flags += ["-I" + p for p in cpp_extension.include_paths()]
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    pretty = done.stdout.splitlines() if done.returncode == 0 else names
    short = {}
    for mangled, name in zip(names, pretty, strict=True):
        name = re.sub(r"\(anonymous namespace\)::|\b\w+::", "", name)  # namespaces
        name = re.sub(r"^void ", "", name)
        short[mangled] = name[: name.index("(")] if "(" in name else name  # the parameters
    return short


_ENTRY = re.compile(r"Compiling entry function '(?P<name>\w+)' for '(?P<arch>sm_\d+)'")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads"
)
_USED = re.compile(r"Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


def _ptx_vector_counts(keep_dir: Path, arch: str) -> dict[str, tuple[int, int]]:
    """Per kernel entry of the kept PTX of ``arch``: (16-byte global loads, 16-byte stores)."""
    counts = {}
    for ptx in keep_dir.glob("*.ptx"):
        text = ptx.read_text()
        if not re.search(rf"^\.target\s+{arch}\b", text, re.M):
            continue
        for entry in re.finditer(r"\.entry\s+(\w+)\s*\(", text):
            end = text.find("\n}", entry.end())
            body = text[entry.end() : end if end >= 0 else len(text)]
            loads = len(re.findall(r"\bld\.global(?:\.nc)?(?:\.\w+)*\.v4\.", body))
            stores = len(re.findall(r"\bst\.global(?:\.\w+)*\.v4\.", body))
            counts[entry.group(1)] = (loads, stores)
    return counts


def report_file(source: Path, archs=DEFAULT_ARCHS) -> list[KernelUsage]:
    """Compile one .cu file and return the usage of each of its kernels on each architecture."""
    with tempfile.TemporaryDirectory() as keep:
        cmd = [nvcc(), *_compile_flags(archs), "--keep-dir", keep, str(source)]
        cmd += ["-o", str(Path(keep) / "out.fatbin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name}:\n{done.stderr[-8000:]}")
        vectors = {f"sm_{a}": _ptx_vector_counts(Path(keep), f"sm_{a}") for a in archs}
    rows, current = [], None
    for line in done.stderr.splitlines():
        if m := _ENTRY.search(line):
            current = {"name": m["name"], "arch": m["arch"]}
        elif current and (m := _FRAME.search(line)):
            current.update(stack=int(m["stack"]), stores=int(m["stores"]), loads=int(m["loads"]))
        elif current and "stack" in current and (m := _USED.search(line)):
            current.update(regs=int(m["regs"]), smem=int(m["smem"] or 0))
            rows.append(current)
            current = None
    names = _demangle(sorted({r["name"] for r in rows}))
    return [
        KernelUsage(
            file=source.name,
            kernel=names[r["name"]],
            arch=r["arch"],
            registers=r["regs"],
            stack_bytes=r["stack"],
            spill_store_bytes=r["stores"],
            spill_load_bytes=r["loads"],
            shared_bytes=r["smem"],
            v4_loads=vectors[r["arch"]].get(r["name"], (0, 0))[0],
            v4_stores=vectors[r["arch"]].get(r["name"], (0, 0))[1],
        )
        for r in rows
    ]


def report(archs=DEFAULT_ARCHS, sources=None) -> list[KernelUsage]:
    """Every kernel of csrc/cuda (or ``sources``), files compiled in parallel."""
    sources = sorted(sources or CUDA_DIR.glob("*.cu"))
    jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda s: report_file(s, archs), sources))
    rows = [row for rows in results for row in rows]
    return sorted(rows, key=lambda r: (r.file, r.kernel, r.arch))


def markdown(rows: list[KernelUsage]) -> str:
    """The report as a Markdown table."""
    head = [
        "file", "kernel", "arch", "registers", "stack B", "spill stores B", "spill loads B",
        "smem B", "16-B loads", "16-B stores",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.file, f"`{r.kernel}`", r.arch, r.registers, r.stack_bytes, r.spill_store_bytes,
            r.spill_load_bytes, r.shared_bytes, r.v4_loads, r.v4_stores,
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="e.g. 80,90")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = report(tuple(a.strip() for a in args.archs.split(",") if a.strip()))
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    spilling = [r for r in rows if r.spill_store_bytes or r.spill_load_bytes]
    for r in spilling:
        print(f"spills: {r.kernel} on {r.arch}", file=sys.stderr)
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
