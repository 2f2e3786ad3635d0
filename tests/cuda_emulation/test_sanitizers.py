"""The CUDA kernels under sanitizers, on a subset of test_cuda_kernels.py's cases.

Each run is a child pytest process with the sanitizer's runtime preloaded (the interpreter is not
instrumented) and the emulation library built with it:

- ``asan``: AddressSanitizer + UndefinedBehaviorSanitizer on csrc/cuda: reads or writes outside any
  buffer (inputs included, which the canaries do not cover), misaligned 16-byte accesses,
  undefined behaviour;
- ``tsan``: ThreadSanitizer with every CUDA thread a fiber, two blocks at a time: data races between
  CUDA threads of a block (ordered only by __syncthreads and warp exchanges) and between blocks.

test_planted_bugs.py shows that both report what they are here for.
"""

import subprocess
import sys

import pytest

from .emu_build import REPO, build_library, sanitizer_env

# One edit case per path (vectorized with tails, scalar, misaligned, bf16, several groups), the
# multi-adapter edit's mixed tiles and per-adapter groups, the retraction's methods on the shape
# whose warps run unequal shuffle counts and on r = 33 (the block's r×r factorizations with
# partial sweeps), the Householder fallback, and retract_list_'s one launch over a table of
# matrices (cholqr2 and polar; blocks of different shapes run two at a time under TSan).
SUBSET = (
    "emulated and ("
    "fp32-vec-row-tail-rank-tail-2-sweeps or fp32-misaligned-rows-scalar or bf16-vec-2-sweeps "
    "or fp32-3-groups-partial-last or 3x5x1030-fp32 or 2x33x300-fp32 or fp32-cholqr2 "
    "or list_matches_truth and fp32-polar "
    "or fp32-vec-mixed-tiles or fp32-groups-per-adapter-and-empty"
    ")"
)
TIMEOUT_S = 600


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_kernels_clean_under_sanitizer(variant):
    build_library(variant)  # build here, so a compile error is reported as such
    env = sanitizer_env(variant)
    env["REFT_EXT_EMU_VARIANT"] = variant
    if variant == "tsan":
        env["REFT_EXT_EMU_CONCURRENT_BLOCKS"] = "2"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/cuda_emulation/test_cuda_kernels.py", "-q"]
        + ["-p", "no:cacheprovider", "-k", SUBSET],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "Sanitizer" not in output and "runtime error" not in output, output[-6000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
