"""The CUDA kernels on shapes chosen for their launch geometry, against the float64 truth.

Every shape below fills all 32 lanes of the warps that reduce and hits a tail of the kernels'
tiling (csrc/cuda): row tiles of 4 rows (N % 4 != 0), rank chunks of 8 (r % 8 != 0), column sweeps
of 256 threads × V elements (d beyond one sweep), the 16-byte vectorized path and the scalar one
(d % V != 0, or a misaligned row pointer), several parameter-gradient groups with a partial last
one, and, for the retraction, warps that run different numbers of shuffles and the Householder
fallback.

The same tests run on the emulated CUDA device (CPU tensors, every test run) and on a real GPU
where one is present (bench/gpu_check.sh), so the two can be compared shape for shape.
"""

import pytest
import torch
from test_lowrank_edit_act import act_inputs
from truth import (
    assert_close_rel,
    max_abs_err,
    max_rel,
    orth_error,
    polar_truth,
    qr_truth,
    truth_lowrank_edit,
    truth_lowrank_edit_act,
    truth_multi_and_grads,
)

import reft_ext
from reft_ext import reference

GPUS = [
    pytest.param("cpu", id="emulated", marks=pytest.mark.cuda_emulated),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.fixture(params=GPUS)
def gpu(request):
    """The device a CUDA kernel runs on: "cpu" under the emulator, "cuda" on a GPU."""
    return request.param


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# (N, d, r, dtype, misaligned): what each case reaches is in its id.
EDIT_CASES = {
    "fp32-vec-row-tail-rank-tail-2-sweeps": (13, 1028, 11, torch.float32, False),
    "fp32-scalar-d-2-sweeps-full-chunk": (6, 1030, 8, torch.float32, False),
    "fp32-misaligned-rows-scalar": (5, 1028, 3, torch.float32, True),
    "fp64-vec-2-sweeps": (7, 514, 9, torch.float64, False),
    "bf16-vec-2-sweeps": (9, 2056, 5, torch.bfloat16, False),
    "fp16-odd-d-scalar-3-chunks": (3, 2049, 17, torch.float16, False),
    "fp32-3-groups-partial-last": (301, 300, 2, torch.float32, False),
    "bf16-3-groups-pairs": (260, 514, 1, torch.bfloat16, False),
    "fp64-one-row-one-column": (1, 1, 1, torch.float64, False),
}


def _edit_inputs(N, d, r, dtype, misaligned, device):
    acc = _acc(dtype)
    h64 = torch.randn(N, d, dtype=torch.float64)
    if misaligned:  # contiguous rows whose start is one element past a 16-byte boundary
        h = torch.empty(N * d + 1, dtype=dtype, device=device)[1:].view(N, d)
        h.copy_(h64)
    else:
        h = h64.to(device, dtype)
    P = (torch.randn(r, d, dtype=torch.float64) / d**0.5).to(device, acc)
    Q = (torch.randn(r, d, dtype=torch.float64) / d**0.5).to(device, acc)
    b = torch.randn(r, dtype=torch.float64).to(device, acc)
    return [t.requires_grad_() for t in (h, P, Q, b)]


@pytest.mark.parametrize("case", list(EDIT_CASES))
def test_edit_forward_backward_match_truth(gpu, case):
    """Output and the gradients of h, P, Q, b match the float64 truth; bf16/fp16 h within 2× the
    error of the naive composite in the same dtype (P, Q, b gradients accumulate in float32)."""
    N, d, r, dtype, misaligned = EDIT_CASES[case]
    leaves = _edit_inputs(N, d, r, dtype, misaligned, gpu)
    out = reft_ext.lowrank_edit(*leaves)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64 = truth_lowrank_edit(*leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())

    def naive():  # the composite in h's dtype: (out, ∂h)
        out = reference.lowrank_edit(*leaves)
        return out, torch.autograd.grad(out, leaves[0], grad_out)[0]

    _assert_matches_truth(dtype, (out, grads), (out64.detach(), grads64), naive)


def _assert_matches_truth(dtype, fused, truth64, naive):
    """fused = (out, grads) against truth64 = (out64, grads64): in float64 and float32 to the
    truths' tolerance; with bf16/fp16 rows, out and ∂h within twice the error of naive() = (out,
    ∂h) computed in that dtype, and the (float32) parameter gradients to 1e-4."""
    (out, grads), (out64, grads64) = fused, truth64
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    if dtype in (torch.float64, torch.float32):
        assert_close_rel(out, out64)
        for g, g64 in zip(grads, grads64, strict=True):
            assert_close_rel(g, g64)
        return
    naive_out, naive_grad_h = naive()
    assert max_abs_err(out, out64) <= 2 * max_abs_err(naive_out, out64) + 1e-6
    assert max_abs_err(grads[0], grads64[0]) <= 2 * max_abs_err(naive_grad_h, grads64[0]) + 1e-6
    for g, g64 in zip(grads[1:], grads64[1:], strict=True):
        assert_close_rel(g, g64, rel=1e-4)


def _edit_bits(gpu):
    N, d, r, dtype, misaligned = EDIT_CASES["fp32-3-groups-partial-last"]
    torch.manual_seed(1)
    leaves = _edit_inputs(N, d, r, dtype, misaligned, gpu)
    out = reft_ext.lowrank_edit(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, torch.ones_like(out))]


SCHEDULES = {
    "reverse-blocks": {"REFT_EXT_EMU_BLOCK_ORDER": "reverse"},
    "random-blocks": {"REFT_EXT_EMU_BLOCK_ORDER": "random:7"},
    "two-blocks-at-a-time": {"REFT_EXT_EMU_CONCURRENT_BLOCKS": "2"},
    "descending-warps": {"REFT_EXT_EMU_WARP_ORDER": "descending"},
}


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_edit_bitwise_deterministic_across_runs_and_schedules(schedule, monkeypatch):
    """The edit kernels use no atomics and fixed reduction orders: the same bits on a second run
    and whatever order the blocks and warps run in."""
    first, second = _edit_bits("cpu"), _edit_bits("cpu")
    for name, value in SCHEDULES[schedule].items():
        monkeypatch.setenv(name, value)
    scheduled = _edit_bits("cpu")
    for a, b, c in zip(first, second, scheduled, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


# --------------------------------------------------------------------------------------------------
# Multi-adapter edit

# (N, d, A, r, dtype, pattern): row tiles that mix adapters and unedited rows (BGMV-style rows in
# edit_rows_kernel), the vectorized and the scalar path, adapters with several partial-sum groups
# and a partial last one next to adapters with none (the device-side group plan), and a rank tail.
MULTI_CASES = {
    "fp32-vec-mixed-tiles": (13, 1028, 5, 11, torch.float32, "mixed"),
    "fp32-scalar-mixed-tiles": (10, 1030, 3, 3, torch.float32, "mixed"),
    "bf16-vec-mixed-tiles": (9, 2056, 4, 5, torch.bfloat16, "mixed"),
    "fp64-vec-mixed-tiles": (7, 514, 2, 9, torch.float64, "mixed"),
    "fp32-groups-per-adapter-and-empty": (700, 36, 6, 2, torch.float32, "blocks"),
    "fp32-40-adapters-sparse": (90, 64, 40, 3, torch.float32, "mixed"),
}


def _multi_adapter_index(N, A, pattern):
    if pattern == "mixed":  # any adapter or -1, row by row
        return torch.randint(-1, A, (N,))
    # Long interleaved runs: adapters 0 and 3 get 300 rows each (3 groups of 128 rows at r = 2,
    # the last partial), adapter 1 a short run, 2 and 5 none, plus unedited rows.
    runs = [(0, 150), (3, 200), (-1, 20), (1, 10), (0, 150), (3, 100), (4, 70)]
    index = torch.cat([torch.full((n,), a) for a, n in runs])
    assert index.numel() == N
    return index


@pytest.mark.parametrize("case", list(MULTI_CASES))
def test_multi_edit_forward_backward_match_truth(gpu, case):
    """lowrank_edit_multi: output and the gradients of h and of every adapter's P, Q, b against
    the row-by-row float64 truth (bf16: within 2× the gather-einsum composite's error)."""
    N, d, A, r, dtype, pattern = MULTI_CASES[case]
    acc = _acc(dtype)
    h = torch.randn(N, d, dtype=torch.float64).to(gpu, dtype).requires_grad_()
    P, Q = ((torch.randn(A, r, d, dtype=torch.float64) / d**0.5).to(gpu, acc) for _ in range(2))
    b = torch.randn(A, r, dtype=torch.float64).to(gpu, acc)
    leaves = [h, P.requires_grad_(), Q.requires_grad_(), b.requires_grad_()]
    adapter = _multi_adapter_index(N, A, pattern).to(gpu)
    out = reft_ext.lowrank_edit_multi(*leaves, adapter)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    out64, grads64 = truth_multi_and_grads(leaves, adapter, grad_out)
    if dtype in (torch.float64, torch.float32):
        assert_close_rel(out, out64.detach())
        for g, g64 in zip(grads, grads64, strict=True):
            assert_close_rel(g, g64)
        return
    naive = reference.lowrank_edit_multi(*leaves, adapter)
    (naive_grad_h,) = torch.autograd.grad(naive, leaves[0], grad_out)
    assert max_abs_err(out, out64) <= 2 * max_abs_err(naive, out64) + 1e-6
    assert max_abs_err(grads[0], grads64[0]) <= 2 * max_abs_err(naive_grad_h, grads64[0]) + 1e-6
    for g, g64 in zip(grads[1:], grads64[1:], strict=True):
        assert_close_rel(g, g64, rel=1e-4)


def _multi_bits(gpu):
    N, d, A, r, dtype, pattern = MULTI_CASES["fp32-groups-per-adapter-and-empty"]
    torch.manual_seed(1)
    h = torch.randn(N, d, device=gpu, requires_grad=True)
    P, Q = (torch.randn(A, r, d, device=gpu, requires_grad=True) for _ in range(2))
    b = torch.randn(A, r, device=gpu, requires_grad=True)
    out = reft_ext.lowrank_edit_multi(h, P, Q, b, _multi_adapter_index(N, A, pattern).to(gpu))
    return [out.detach(), *torch.autograd.grad(out, (h, P, Q, b), torch.ones_like(out))]


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_multi_edit_bitwise_deterministic_across_schedules(schedule, monkeypatch):
    """The device-side plan and the per-adapter sums run in a fixed order whatever the schedule."""
    first = _multi_bits("cpu")
    for name, value in SCHEDULES[schedule].items():
        monkeypatch.setenv(name, value)
    for a, b in zip(first, _multi_bits("cpu"), strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda_emulated
def test_multi_edit_bad_index_is_a_device_side_assert():
    """An index outside [-1, A) is caught by the asynchronous assert (on the emulated device it
    raises at once) before any kernel reads a factor out of bounds."""
    h, P, Q, b = (torch.randn(s) for s in ((6, 16), (2, 3, 16), (2, 3, 16), (2, 3)))
    with pytest.raises(RuntimeError, match="outside \\[-1, A\\)"):
        reft_ext.lowrank_edit_multi(h, P, Q, b, torch.tensor([0, 1, 2, 0, 1, -1]))


# --------------------------------------------------------------------------------------------------
# Retraction

# (k, r, d): r = 5 gives 15 Gram pairs over 8 warps (warps run 2 or 1 shuffle sequences), r = 32
# fills every warp, d = 1030 takes the d-long passes beyond one sweep of 256 threads. The block's
# r×r factorizations (retraction_parallel.cuh): r = 1 has no trailing update and a one-row pivot
# search; r = 33 leaves a partial sweep of 256 threads over its 1089 entries and puts row 32 on
# lane 0's second turn of the pivot search; r = 64 gives every thread 16 entries and every lane two
# rows.
RETRACT_SHAPES = [(3, 1, 300), (2, 5, 5), (3, 5, 1030), (2, 32, 300), (2, 33, 300), (1, 64, 200)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ORTH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
MATCH_TOL = {torch.float64: 1e-11, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.mark.parametrize("method", ["cholqr2", "qr", "polar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", RETRACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_retract_matches_truth(gpu, shape, dtype, method):
    """Rows orthonormal and equal to the float64 sign-fixed QR factor (polar: U Vᵀ)."""
    R0 = torch.randn(shape, dtype=torch.float64).to(gpu, dtype)
    R = reft_ext.retract_(R0.clone(), method)
    assert orth_error(R) <= ORTH_TOL[dtype]
    truth = polar_truth(R0) if method == "polar" else qr_truth(R0)
    assert max_rel(R, truth) <= MATCH_TOL[dtype]


# κ above the first Cholesky pass's bound (≈ u^-1/4: 64 in float32, 1e4 in float64), below 1/u.
FALLBACK_KAPPA = {torch.float64: (1e7, 1e-8), torch.float32: (1e3, 1e-3)}  # κ, match tolerance


@pytest.mark.parametrize("method", ["cholqr2", "polar"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_retract_householder_fallback(gpu, dtype, method):
    """A rank-deficient matrix (repeated rows) and an ill-conditioned one fail the Cholesky pivot
    test and take the Householder path: orthonormal rows, and on the full-rank one still the unique
    factor (to κ·u)."""
    base = torch.randn(4, 1030, dtype=torch.float64)
    repeated = torch.cat([base, base[:2]])  # rows 4, 5 repeat rows 0, 1
    kappa, tol = FALLBACK_KAPPA[dtype]
    U, _, Vh = torch.linalg.svd(torch.randn(6, 1030, dtype=torch.float64), full_matrices=False)
    ill = (
        U
        @ torch.diag(
            torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), 6, dtype=torch.float64)
        )
        @ Vh
    )
    assert orth_error(reft_ext.retract_(repeated.to(gpu, dtype), method)) <= ORTH_TOL[dtype]
    R = reft_ext.retract_(ill.to(gpu, dtype), method)
    assert orth_error(R) <= ORTH_TOL[dtype]
    assert max_rel(R, polar_truth(ill) if method == "polar" else qr_truth(ill)) <= tol


def _retract_bits():
    torch.manual_seed(2)
    batch = reft_ext.retract_(torch.randn(5, 5, 1030), "polar")
    listed = reft_ext.retract_list_([torch.randn(s) for s in LIST_SHAPES], "polar")
    return [batch, *listed]


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_retract_bitwise_deterministic_across_schedules(schedule, monkeypatch):
    """A batch and a list (one launch over tensors of several r and d, r = 33 and 64 among them):
    the block-parallel factorizations sum in a fixed order whatever order the blocks and warps run
    in."""
    first = _retract_bits()
    for name, value in SCHEDULES[schedule].items():
        monkeypatch.setenv(name, value)
    for a, b in zip(first, _retract_bits(), strict=True):
        assert torch.equal(a, b)


# retract_list_'s one launch: single matrices and (k, r, d) batches of different r and d in one
# table, r = 1, 33 and 64 included, d = 1030 beyond one sweep.
LIST_SHAPES = [(3, 40), (2, 4, 33), (1, 1), (64, 70), (3, 33, 300), (5, 1030)]
METHODS = ["cholqr2", "qr", "polar"]


def _truth(R, method):
    return polar_truth(R) if method == "polar" else qr_truth(R)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32", "bf16", "fp16"])
def test_retract_list_matches_truth(gpu, dtype, method):
    """Every matrix of every tensor retracted in place by the one launch (low precision: through
    float32 copies written back), against the float64 truth, and equal to retract_ on each tensor
    alone (the same kernel body, so the same bits)."""
    Rs0 = [torch.randn(s, dtype=torch.float64).to(gpu, dtype) for s in LIST_SHAPES]
    Rs = [R.clone() for R in Rs0]
    pointers = [R.data_ptr() for R in Rs]
    assert reft_ext.retract_list_(Rs, method) is Rs
    assert [R.data_ptr() for R in Rs] == pointers  # in place
    for R, R0 in zip(Rs, Rs0, strict=True):
        assert orth_error(R) <= ORTH_TOL[dtype]
        assert max_rel(R, _truth(R0, method)) <= MATCH_TOL[dtype]
        assert torch.equal(R, reft_ext.retract_(R0.clone(), method))


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_retract_list_non_finite_matrix(dtype):
    """NaN in one matrix of one tensor of the list: with check_finite the device-side assert
    raises (on the emulated device at once), that matrix is left as it was and every other is
    retracted; without it, that matrix alone comes back as NaN."""
    Rs0 = [torch.randn(s, dtype=torch.float64).to(dtype) for s in LIST_SHAPES]
    Rs0[4][1, 7, 20] = float("nan")
    Rs = [R.clone() for R in Rs0]
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        reft_ext.retract_list_(Rs, "cholqr2")
    assert torch.equal(Rs[4][1].nan_to_num(), Rs0[4][1].nan_to_num())
    unchecked = reft_ext.retract_list_([R.clone() for R in Rs0], "cholqr2", check_finite=False)
    assert torch.isnan(unchecked[4][1]).all()
    for out in (Rs, unchecked):
        for i, (R, R0) in enumerate(zip(out, Rs0, strict=True)):
            good = [R[k] for k in (0, 2)] if i == 4 else [R]
            truths = [R0[k] for k in (0, 2)] if i == 4 else [R0]
            for got, want in zip(good, truths, strict=True):
                assert max_rel(got, qr_truth(want)) <= MATCH_TOL[dtype]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_retract_list_is_one_launch_on_a_gpu():
    """retract_list_ launches retract_kernel once for the whole list (the emulator does not count
    launches; the profiler does)."""
    Rs = [torch.randn(s, device="cuda") for s in LIST_SHAPES]
    reft_ext.retract_list_(Rs)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        reft_ext.retract_list_(Rs)
        torch.cuda.synchronize()
    launches = [e for e in profile.events() if "retract_kernel" in e.name]
    assert len(launches) == 1, [e.name for e in launches]


# --------------------------------------------------------------------------------------------------
# Activated edit (lowrank_edit_act)

# (N, d, r, dtype, subtract, activation): 2r projections reduced in chunks of 8 (2r = 22: a chunk
# tail), the map between the phases on each tile's rows, ∂v's 2r rows in the parameter sums.
ACT_CASES = {
    "fp32-vec-2r-chunk-tail-gelu": (13, 1028, 11, torch.float32, True, "gelu"),
    "fp32-scalar-d-silu": (6, 1030, 8, torch.float32, True, "silu"),
    "fp32-3-groups-no-S-tanh": (301, 300, 2, torch.float32, False, "tanh"),
    "fp64-relu": (7, 514, 9, torch.float64, True, "relu"),
    "bf16-vec-gelu-tanh": (9, 2056, 5, torch.bfloat16, True, "gelu_tanh"),
    "fp16-odd-d-sigmoid": (3, 2049, 3, torch.float16, True, "sigmoid"),
}


@pytest.mark.parametrize("case", list(ACT_CASES))
def test_activated_edit_matches_truth(gpu, case):
    """Output and the gradients of h, W, b, Q, S, c against the float64 truth (torch's own
    activations); bf16/fp16 h within 2× the error of the same formula in that dtype."""
    N, d, r, dtype, subtract, activation = ACT_CASES[case]
    leaves = act_inputs(N, d, r, dtype, gpu, subtract, param_dtype=_acc(dtype))
    out = reft_ext.lowrank_edit_act(activation=activation, **leaves)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    leaves64 = {k: t.detach().double().requires_grad_() for k, t in leaves.items()}
    out64 = truth_lowrank_edit_act(activation=activation, **leaves64)
    grads64 = torch.autograd.grad(out64, list(leaves64.values()), grad_out.double())

    def naive():  # the same formula, parameters too, in h's dtype: (out, ∂h)
        low = {k: t.detach().to(dtype).requires_grad_() for k, t in leaves.items()}
        out = truth_lowrank_edit_act(activation=activation, **low)
        return out, torch.autograd.grad(out, low["h"], grad_out)[0]

    _assert_matches_truth(dtype, (out, grads), (out64.detach(), grads64), naive)
