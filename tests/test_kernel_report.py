"""The static CUDA kernel report (tools/kernel_report.py): no kernel spills, the vectorized
variants really issue 16-byte accesses, and every kernel of csrc/cuda is in it for sm_80 and sm_90.

Needs nvcc (no GPU). Where the build must contain the CUDA kernels (REFT_EXT_EXPECT_CUDA=1, as in
CI) a missing nvcc is a failure, not a skip.
"""

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kernel_report", REPO / "tools" / "kernel_report.py")
kernel_report = importlib.util.module_from_spec(_spec)
sys.modules["kernel_report"] = kernel_report  # (dataclasses look their module up there)
_spec.loader.exec_module(kernel_report)

HAVE_NVCC = bool(os.environ.get("CUDA_HOME") or shutil.which("nvcc"))
pytestmark = pytest.mark.skipif(
    not HAVE_NVCC and os.environ.get("REFT_EXT_EXPECT_CUDA") != "1", reason="no nvcc"
)
ELEMENT_BYTES = {"float": 4, "double": 8, "Half": 2, "BFloat16": 2}


@pytest.fixture(scope="module")
def rows():
    return kernel_report.report(kernel_report.DEFAULT_ARCHS)


def test_no_kernel_spills(rows):
    spilling = [(r.kernel, r.arch) for r in rows if r.spill_store_bytes or r.spill_load_bytes]
    assert not spilling, f"kernels that spill registers: {spilling}"


def test_every_kernel_reported_for_every_arch(rows):
    declared = set()
    for source in kernel_report.CUDA_DIR.glob("*.cu"):
        text = re.sub(r"__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)", "", source.read_text())
        declared |= set(re.findall(r"__global__[^(]*?\b(\w+)\s*\(", text, re.S))
    assert {"edit_rows_kernel", "outer_partials_kernel", "retract_kernel"} <= declared
    for arch in kernel_report.DEFAULT_ARCHS:
        reported = {r.kernel.split("<")[0] for r in rows if r.arch == f"sm_{arch}"}
        assert declared <= reported, declared - reported


def test_vectorized_edit_variants_issue_16_byte_accesses(rows):
    checked = 0
    for r in rows:
        m = re.fullmatch(r"edit_rows_kernel<(\w+), \w+, (\d+), (?:true|false)>", r.kernel)
        if m and ELEMENT_BYTES[m[1]] * int(m[2]) == 16:
            assert r.v4_loads > 0 and r.v4_stores > 0, r
            checked += 1
    # float, double, half, bfloat16; single-adapter and indexed (multi-adapter)
    assert checked == 8 * len(kernel_report.DEFAULT_ARCHS)
