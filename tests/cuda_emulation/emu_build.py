"""Build of the CUDA emulation library: csrc/cuda rewritten (rewrite.py) and compiled with the
system C++ compiler against the installed torch, no nvcc and no GPU.

``build_library(variant)`` returns the path of ``libreft_ext_emu.so``; loading it
(``torch.ops.load_library``) registers ``torch.ops.reft_ext_emu.*``: the CUDA host functions and
kernels of csrc/cuda, run on CPU tensors by the emulator. Variants:

- ``default``: the emulator alone (poisoning, canaries, barrier and warp checks);
- ``asan``: AddressSanitizer + UndefinedBehaviorSanitizer on the CUDA files (out-of-bounds reads
  and writes, misaligned 16-byte accesses, undefined behaviour); load it in a process started with
  ``sanitizer_env("asan")``;
- ``tsan``: ThreadSanitizer on the CUDA files, every CUDA thread a TSan fiber ordered only by the
  barriers and warp exchanges it takes part in (data races between CUDA threads); run it with
  ``REFT_EXT_EMU_CONCURRENT_BLOCKS=2`` to also race two blocks.

Object files are cached under ``build/cuda_emulation/`` by a hash of their inputs (sources, headers,
flags, torch, compiler); ``REFT_EXT_EMU_BUILD_DIR`` moves the cache.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNTIME = HERE / "runtime"
INCLUDE = HERE / "include"
CXX = os.environ.get("CXX", "g++")

SANITIZER_FLAGS = {
    "default": [],
    "asan": [
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer",
    ],
    "tsan": ["-fsanitize=thread"],
}
RUNTIME_DEFINES = {"default": [], "asan": ["-DCUDA_EMU_ASAN"], "tsan": ["-DCUDA_EMU_TSAN"]}
VARIANTS = tuple(SANITIZER_FLAGS)


def _common_flags() -> list[str]:
    flags = ["-std=c++20", "-fPIC", "-fvisibility=hidden", "-O1", "-g1", "-ffp-contract=off"]
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags += ["-isystem" + p for p in cpp_extension.include_paths()]
    return flags + [f"-I{RUNTIME}"]


@functools.cache  # one `g++ --version` per process, not one per object digest
def _compiler_version() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


def _units_and_flags(csrc: Path, src_dir: Path, variant: str):
    from .rewrite import rewrite_tree

    units = rewrite_tree(csrc, src_dir)
    common = _common_flags()
    cuda_flags = [
        *common,
        f"-I{INCLUDE}",  # before torch's: the c10/cuda stand-ins
        "-include",
        str(RUNTIME / "cuda_emu.h"),
        *SANITIZER_FLAGS[variant],
        "-x",
        "c++",
    ]
    jobs = [(unit, cuda_flags) for unit in units]
    # The runtime is not instrumented: TSan must not see the scheduler's own bookkeeping, which the
    # fibers share without synchronizing (they are ordered by the emulated barriers instead).
    jobs.append((RUNTIME / "cuda_emu.cpp", [*common, *RUNTIME_DEFINES[variant]]))
    return jobs


def _object_digest(unit: Path, flags: list[str], headers: list[Path]) -> str:
    """Hash of what an object file depends on: the unit, every header it may include, the flags,
    torch and the compiler (a planted bug in one file recompiles that file only)."""
    h = hashlib.sha256()
    for path in [unit, *headers]:
        h.update(str(path).encode())
        h.update(path.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(f"{torch.__version__} {_compiler_version()}".encode())
    return h.hexdigest()[:20]


def _compile(unit: Path, flags: list[str], obj: Path) -> None:
    # The CUDA files include "../x.h" relative to their own folder: the rewritten tree keeps csrc's
    # layout, so they find the rewritten copies.
    cmd = [CXX, *flags, "-c", str(unit), "-o", str(obj) + ".tmp"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"CUDA emulation: compiling {unit.name} failed:\n{done.stderr[-20000:]}\ncommand: "
            + " ".join(cmd)
        )
    os.replace(str(obj) + ".tmp", obj)


def build_library(
    variant: str = "default", csrc: Path | None = None, cache: Path | None = None
) -> Path:
    """Compile (or reuse) the emulation library of ``csrc`` (default: this repo's) for ``variant``.

    Object files are cached by content under ``cache`` (default ``build/cuda_emulation`` or
    ``REFT_EXT_EMU_BUILD_DIR``); the library goes next to the rewritten sources.
    """
    if variant not in SANITIZER_FLAGS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    csrc = (csrc or REPO / "csrc").resolve()
    default_cache = os.environ.get("REFT_EXT_EMU_BUILD_DIR", REPO / "build" / "cuda_emulation")
    cache = Path(cache or default_cache)
    tree = cache / ("tree-" + hashlib.sha256(f"{csrc} {variant}".encode()).hexdigest()[:12])
    jobs = _units_and_flags(csrc, tree / "src", variant)
    headers = sorted(
        p
        for p in [*(tree / "src").rglob("*"), *RUNTIME.rglob("*.h"), *INCLUDE.rglob("*.h")]
        if p.suffix in {".h", ".cuh"}
    )
    objects = [cache / "objects" / f"{_object_digest(u, f, headers)}.o" for u, f in jobs]
    objects[0].parent.mkdir(parents=True, exist_ok=True)
    library = tree / f"libreft_ext_emu-{hashlib.sha256(str(objects).encode()).hexdigest()[:12]}.so"
    if library.exists():
        return library
    missing = [(u, f, o) for (u, f), o in zip(jobs, objects, strict=True) if not o.exists()]
    workers = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers) as pool:
        for result in [pool.submit(_compile, u, f, o) for u, f, o in missing]:
            result.result()
    lib_dir = cpp_extension.library_paths()[0]
    link = [CXX, "-shared", *SANITIZER_FLAGS[variant], *map(str, objects), f"-L{lib_dir}"]
    link += [f"-Wl,-rpath,{lib_dir}", "-lc10", "-ltorch_cpu", "-o", str(library) + ".tmp"]
    done = subprocess.run(link, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"CUDA emulation: linking failed:\n{done.stderr[-20000:]}")
    os.replace(str(library) + ".tmp", library)
    return library


def sanitizer_env(variant: str) -> dict[str, str]:
    """Environment for a child process that loads the ``variant`` library (sanitizer runtimes
    preloaded: the Python interpreter itself is not instrumented)."""
    env = dict(os.environ)
    if variant == "default":
        return env
    runtime = {"asan": "libasan.so", "tsan": "libtsan.so"}[variant]
    preload = [
        subprocess.run(
            [CXX, f"-print-file-name={name}"], capture_output=True, text=True
        ).stdout.strip()
        for name in ([runtime, "libubsan.so"] if variant == "asan" else [runtime])
    ]
    env["LD_PRELOAD"] = " ".join(preload)
    env["PYTHONMALLOC"] = "malloc"
    env["OMP_NUM_THREADS"] = "1"
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=86:verify_asan_link_order=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=87"
    env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=88:report_signal_unsafe=0"
    return env


if __name__ == "__main__":  # python -m cuda_emulation.emu_build [variant]   (from tests/)
    print(build_library(sys.argv[1] if len(sys.argv) > 1 else "default"))
