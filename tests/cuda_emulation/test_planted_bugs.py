"""Proof that the CUDA emulation catches the bugs that matter: each test plants one bug in a copy of
csrc/, builds that copy's emulation library and runs an op on it in a child process (a crash or a
hang there is a result, not a dead test run), then asserts that the bug is reported: by the
emulator itself, by the float64 truth, or by a sanitizer.

Each mutation names the exact text it replaces; when csrc changes so that the text is gone, the
test fails and the mutation must be updated (it never silently tests nothing).
"""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .emu_build import REPO, build_library, sanitizer_env

EDIT = "cuda/lowrank_edit_cuda.cu"
RETRACT = "cuda/retraction_cuda.cu"
PARALLEL = "cuda/retraction_parallel.cuh"
WARP = "cuda/warp_reduce.cuh"

# name: (file, original text, planted text, variant, how it must be reported)
MUTATIONS = {
    "write-one-past-an-output": (
        EDIT,
        "    grad_b[a * rp + k] = total;\n",
        "    grad_b[a * rp + k] = total;\n    if (k == rp - 1) grad_b[a * rp + rp] = total;\n",
        "default",
        ("backward", "error", "out-of-bounds write"),
    ),
    "output-element-never-written": (
        EDIT,
        "      if (i < rows && k < rA) {",
        "      if (i < rows && k < rA && !(row0 + i == N - 1 && k == rA - 1)) {",
        "default",
        ("forward", "wrong", None),
    ),
    "broken-warp-reduction": (
        WARP,
        "for (int offset = 16; offset > 0; offset /= 2)",
        "for (int offset = 8; offset > 0; offset /= 2)",
        "default",
        ("forward", "wrong", None),
    ),
    "removed-syncthreads": (
        EDIT,
        "        if (lane == 0) warp_partials[warp][i * kChunk + kk] = total;\n      }\n"
        "    __syncthreads();\n",
        "        if (lane == 0) warp_partials[warp][i * kChunk + kk] = total;\n      }\n",
        "default",
        ("forward", "wrong", None),
    ),
    "full-mask-shuffle-in-divergent-branch": (
        EDIT,
        "const acc_t total = warp_sum(acc[i][kk]);",
        "const acc_t total = lane < 16 ? warp_sum(acc[i][kk]) : acc[i][kk];",
        "default",
        ("forward", "error", "deadlock"),
    ),
    "grid-rounded-down": (
        EDIT,
        "const dim3 grid(static_cast<unsigned>(ceil_div(N, kTileRows)));",
        "const dim3 grid(static_cast<unsigned>(N / kTileRows));",
        "default",
        ("forward", "wrong", None),
    ),
    "grid-rounded-down-to-zero": (
        EDIT,
        "const dim3 grid(static_cast<unsigned>(ceil_div(N, kTileRows)));",
        "const dim3 grid(static_cast<unsigned>(N / kTileRows));",
        "default",
        ("forward-3-rows", "error", "invalid configuration"),
    ),
    "launch-not-checked": (
        EDIT,
        "              r_int, by_adapter.first_group, adapters);\n"
        "      C10_CUDA_KERNEL_LAUNCH_CHECK();\n",
        "              r_int, by_adapter.first_group, adapters);\n",
        "default",
        ("backward", "error", "C10_CUDA_KERNEL_LAUNCH_CHECK"),
    ),
    "misaligned-16-byte-load": (
        EDIT,
        "    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;",
        "    (void)p;",
        "asan",
        ("forward-misaligned", "sanitizer", "misaligned address"),
    ),
    "unsynchronized-cholesky-column": (
        PARALLEL,
        "S[i * r + j] /= diagonal;\n    __syncthreads();\n",
        "S[i * r + j] /= diagonal;\n",
        "tsan",
        ("retract", "sanitizer", "data race"),
    ),
    "gauss-jordan-keeps-the-unscaled-pivot-row": (
        PARALLEL,
        "      inv[p * r + j] = a;\n      inv[c * r + j] = b * scale;\n",
        "      inv[c * r + j] = b * scale;\n      inv[p * r + j] = a;\n",
        "default",
        ("retract-polar", "wrong", None),
    ),
    "list-matrices-share-one-scratch": (
        RETRACT,
        "*rows++ = {address, r, d, *work_size, *small_size};",
        "*rows++ = {address, r, d, *work_size, 0};",
        "tsan",
        ("retract-list", "sanitizer", "data race"),
    ),
}

# Runs one op on the given library; prints a JSON verdict (error message or error vs float64).
CHILD = r"""
import json, sys
import torch
torch.ops.load_library(sys.argv[1])
emu = torch.ops.reft_ext_emu
case = sys.argv[2]
torch.manual_seed(0)
def edit_inputs(N, d, r, misaligned=False):
    h = torch.randn(N, d, dtype=torch.float64)
    if misaligned:
        h = torch.empty(N * d + 1, dtype=torch.float32)[1:].view(N, d).copy_(h)
    else:
        h = h.float()
    P, Q = (torch.randn(r, d) / d**0.5 for _ in range(2))
    return h, P, Q, torch.randn(r)
def qr_factor(R0):
    Qt, T = torch.linalg.qr(R0.double().mT)
    return (Qt * torch.sign(torch.diagonal(T, dim1=-2, dim2=-1)).unsqueeze(-2)).mT
def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item() if torch.isfinite(a).all() else float("inf")
try:
    if case.startswith("forward"):
        N = 3 if case == "forward-3-rows" else 13
        h, P, Q, b = edit_inputs(N, 1028, 11, case == "forward-misaligned")
        out, z = emu.lowrank_edit_forward(h, P, Q, b)
        h64, P64, Q64, b64 = (t.double() for t in (h, P, Q, b))
        z64 = h64 @ P64.T + b64
        err = max(rel(out, h64 + z64 @ Q64), rel(z, z64))
    elif case == "backward":
        h, P, Q, b = edit_inputs(13, 1028, 11)
        out, z = emu.lowrank_edit_forward(h, P, Q, b)
        g = torch.randn_like(h)
        gh, gP, gQ, gb = emu.lowrank_edit_backward(g, h, P, Q, z, [True] * 4)
        g64, h64, P64, Q64, z64 = (t.double() for t in (g, h, P, Q, z))
        gz = g64 @ Q64.T
        err = max(rel(gh, g64 + gz @ P64), rel(gP, gz.T @ h64), rel(gQ, z64.T @ g64),
                  rel(gb, gz.sum(0)))
    elif case == "retract-polar":
        R0 = torch.randn(2, 33, 300)
        R = R0.clone()
        emu.retract_(R, "polar")
        U, _, Vh = torch.linalg.svd(R0.double(), full_matrices=False)
        err = rel(R, U @ Vh)
    elif case == "retract-list":
        Rs0 = [torch.randn(s) for s in ((3, 5, 300), (8, 40), (2, 3, 64))]
        Rs = [R.clone() for R in Rs0]
        emu.retract_list_(Rs, "cholqr2")
        err = max(rel(R, qr_factor(R0)) for R, R0 in zip(Rs, Rs0))
    else:
        R0 = torch.randn(3, 5, 300)
        R = R0.clone()
        emu.retract_(R, "cholqr2")
        err = rel(R, qr_factor(R0))
    print(json.dumps({"error": None, "rel": err}))
except RuntimeError as e:
    print(json.dumps({"error": str(e), "rel": None}))
"""

CHILD_TIMEOUT_S = 180
CORRECT_REL = 1e-5  # what the unmutated kernels reach on these cases (fp32 vs float64)


def _mutant_csrc(name: str) -> Path:
    file, original, planted, _, _ = MUTATIONS[name]
    root = REPO / "build" / "cuda_emulation" / "mutants" / name / "csrc"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(REPO / "csrc", root)
    text = (root / file).read_text()
    assert text.count(original) == 1, f"{name}: the text to mutate is not in csrc/{file} once"
    (root / file).write_text(text.replace(original, planted))
    return root


@pytest.fixture(scope="module")
def libraries():
    """Every mutant's library (and the unmutated ones), built two at a time."""
    jobs = {name: (_mutant_csrc(name), spec[3]) for name, spec in MUTATIONS.items()}
    jobs.update({f"control-{v}": (REPO / "csrc", v) for v in ("default", "asan", "tsan")})
    with ThreadPoolExecutor(2) as pool:
        futures = {n: pool.submit(build_library, v, csrc) for n, (csrc, v) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def _run(library: Path, case: str, variant: str):
    env = sanitizer_env(variant)
    if variant == "tsan":
        env["REFT_EXT_EMU_CONCURRENT_BLOCKS"] = "2"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(library), case],
        capture_output=True,
        text=True,
        env=env,
        timeout=CHILD_TIMEOUT_S,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    verdict = json.loads(lines[-1]) if lines else None
    return done.returncode, verdict, done.stderr


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_planted_bug_is_reported(libraries, name):
    _, _, _, variant, (case, how, text) = MUTATIONS[name]
    # The same case on the unmutated kernels is clean: whatever is reported below is the bug.
    code, verdict, stderr = _run(libraries[f"control-{variant}"], case, variant)
    assert code == 0 and verdict and verdict["error"] is None, (code, verdict, stderr[-3000:])
    if how != "error":  # (the zero-grid case is an error by design: no rows to compare)
        assert verdict["rel"] <= CORRECT_REL, verdict
    code, verdict, stderr = _run(libraries[name], case, variant)
    if how == "error":
        assert verdict and verdict["error"] and text in verdict["error"], (verdict, stderr[-3000:])
        assert "launched at" in verdict["error"] or "C10_CUDA" in verdict["error"]
    elif how == "wrong":
        assert verdict and verdict["error"] is None, (verdict, stderr[-3000:])
        assert verdict["rel"] > 1e-3, verdict
    else:
        assert code != 0 and text in stderr, (code, verdict, stderr[-3000:])
