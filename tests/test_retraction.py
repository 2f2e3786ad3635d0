"""Tests of the orthogonal retraction: retract_, project_tangent and keep_orthonormal.

Every check is against an independent float64 truth written here: the QR factor of torch.linalg.qr
with the signs fixed so that the triangular factor has a positive diagonal, the polar factor U Vᵀ of
torch.linalg.svd, and the tangent projection G − sym(G Rᵀ) R written with einsum.
"""

import math

import pytest
import torch
from cpu_variants import VARIANTS, run_forced
from truth import max_rel, orth_error, orth_errors, polar_truth, qr_truth

import reft_ext
from reft_ext.retraction import is_stiefel

METHODS = ["cholqr2", "qr", "polar"]
ROW_SPACE_METHODS = ["cholqr2", "qr"]  # those that return the sign-fixed QR factor
LOW_PRECISION = [torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float64, torch.float32, *LOW_PRECISION]

# max |R Rᵀ − I| allowed for a result of each dtype (low precision: after rounding the rows).
ORTH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Relative tolerances of a computed factor against the float64 truth, for well-conditioned input.
MATCH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


# --------------------------------------------------------------------------------------------------
# Independent float64 truth and measures


def row_space_residual(R0, Q):
    """‖R0 − R0 Qᵀ Q‖ / ‖R0‖ in float64: 0 when every row of R0 lies in Q's row space."""
    R0, Q = R0.detach().to(torch.float64), Q.detach().to(torch.float64)
    return ((R0 - R0 @ Q.mT @ Q).norm() / R0.norm()).item()


def tangent_truth(R, G):
    """G − sym(G Rᵀ) R in float64, with einsum."""
    R, G = R.detach().to(torch.float64), G.detach().to(torch.float64)
    A = torch.einsum("...id,...jd->...ij", G, R)
    return G - torch.einsum("...ij,...jd->...id", 0.5 * (A + A.mT), R)


def ill_conditioned(shape, kappa, generator):
    """R = U diag(s) Vᵀ with singular values log-spaced from 1 to 1/kappa, float64."""
    *batch, r, d = shape
    U = torch.linalg.qr(torch.randn(*batch, r, r, dtype=torch.float64, generator=generator))[0]
    V = torch.linalg.qr(torch.randn(*batch, d, r, dtype=torch.float64, generator=generator))[0]
    s = torch.logspace(0, -math.log10(kappa), r, dtype=torch.float64)
    return U @ torch.diag_embed(s.expand(*batch, r)) @ V.mT


def rand(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# retract_: exact results against the references


SHAPES = [(1, 1), (1, 7), (3, 3), (4, 64), (8, 32), (16, 16)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ROW_SPACE_METHODS)
def test_qr_methods_keep_row_space_and_match_sign_fixed_qr(device, method, shape, dtype):
    R0 = rand(shape, dtype, device)
    R = R0.clone()
    out = reft_ext.retract_(R, method)
    assert out is R and out.dtype == dtype and out.shape == shape
    assert torch.isfinite(out).all()
    assert orth_error(out) <= ORTH_TOL[dtype]
    assert row_space_residual(R0, out) <= MATCH_TOL[dtype]
    assert max_rel(out, qr_truth(R0)) <= MATCH_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_polar_matches_svd_and_is_closest(device, shape, dtype):
    R0 = rand(shape, dtype, device)
    polar = reft_ext.retract_(R0.clone(), "polar")
    assert polar.dtype == dtype and torch.isfinite(polar).all()
    assert orth_error(polar) <= ORTH_TOL[dtype]
    assert max_rel(polar, polar_truth(R0)) <= MATCH_TOL[dtype]
    assert row_space_residual(R0, polar) <= MATCH_TOL[dtype]
    # The polar factor is the closest matrix with orthonormal rows: at least as close as QR's.
    qr = reft_ext.retract_(R0.clone(), "qr")
    R64 = R0.to(torch.float64)
    slack = 10 * MATCH_TOL[dtype] * R64.norm().item()
    assert (polar.double() - R64).norm().item() <= (qr.double() - R64).norm().item() + slack


# Shapes that reach every blocking of the CPU passes (csrc/cpu/retraction_passes.h): Gram pairs four
# at a time plus a remainder (r % 4 != 0), several column chunks (r rows of d beyond one 16 KiB
# chunk), solve blocks of 64 columns plus a tail, and d % 8 != 0 tails. Run in a child process per
# build of the CPU kernels (tests/cpu_variants.py).
BLOCKING_SHAPES = [(5, 1030), (33, 200), (9, 130), (64, 300)]
BLOCKING_TOL = {torch.float64: 1e-12, torch.float32: 1e-4}
_RETRACT_SCRIPT = """
import sys, torch, reft_ext
inputs = torch.load(sys.argv[1])
torch.save([reft_ext.retract_(R.clone(), method) for R, method in inputs], sys.argv[2])
"""


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_pass_blockings_match_truth(tmp_path, variant):
    cases = [
        (torch.randn(shape, dtype=torch.float64).to(dtype), method)
        for shape in BLOCKING_SHAPES
        for dtype in (torch.float64, torch.float32)
        for method in ("cholqr2", "polar")
    ]
    results = run_forced(variant, _RETRACT_SCRIPT, cases, tmp_path)
    for (R0, method), R in zip(cases, results, strict=True):
        truth = polar_truth(R0) if method == "polar" else qr_truth(R0)
        assert orth_error(R) <= ORTH_TOL[R0.dtype], (R0.shape, R0.dtype, method)
        assert max_rel(R, truth) <= BLOCKING_TOL[R0.dtype], (R0.shape, R0.dtype, method)


def test_cholqr2_and_qr_agree(device):
    R0 = rand((6, 40), torch.float64, device)
    a = reft_ext.retract_(R0.clone(), "cholqr2")
    b = reft_ext.retract_(R0.clone(), "qr")
    assert max_rel(a, b) <= 1e-13


@pytest.mark.parametrize("method", METHODS)
def test_orthonormal_input_is_a_fixed_point(device, method):
    Q = qr_truth(rand((5, 30), torch.float64, device))  # positive-diagonal QR factor of itself
    out = reft_ext.retract_(Q.clone(), method)
    assert max_rel(out, Q) <= 1e-13


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_scaling_the_rows_does_not_change_the_result(device, method, dtype):
    """retract(T R) depends on R only through its row space (QR) or polar factor: T = c·I, c > 0."""
    R0 = rand((4, 16), torch.float64, device)
    expected = reft_ext.retract_(R0.to(dtype), method).double()
    for scale in (1e-3, 1e3, 1e-20, 1e20) if dtype == torch.float32 else (1e-150, 1e150):
        out = reft_ext.retract_((R0 * scale).to(dtype), method)
        assert torch.isfinite(out).all(), f"scale {scale}: non-finite result"
        assert orth_error(out) <= ORTH_TOL[dtype], f"scale {scale}"
        assert (out.double() - expected).abs().max().item() <= 10 * MATCH_TOL[dtype], scale


# --------------------------------------------------------------------------------------------------
# Rank-deficient and ill-conditioned input


def _rank_deficient_cases(dtype, device):
    x = torch.randn(6, 20, dtype=torch.float64)
    square = torch.randn(5, 5, dtype=torch.float64)
    cases = {}
    cases["zero_row"] = x.clone()
    cases["zero_row"][2] = 0
    cases["repeated_rows"] = x.clone()
    cases["repeated_rows"][3] = x[1]
    cases["repeated_rows"][5] = x[1]
    cases["scaled_row"] = x.clone()
    cases["scaled_row"][4] = -3 * x[0]
    cases["linear_combination"] = x.clone()
    cases["linear_combination"][5] = x[0] + 2 * x[1]
    cases["all_rows_equal"] = x[:1].repeat(6, 1)
    cases["all_rows_constant"] = torch.full((8, 64), 0.3, dtype=torch.float64)
    cases["all_zero"] = torch.zeros(6, 20, dtype=torch.float64)
    cases["square_full_rank"] = square.clone()
    cases["square_repeated"] = square.clone()
    cases["square_repeated"][4] = square[0]
    cases["square_all_rows_equal"] = square[:1].repeat(5, 1)
    cases["square_all_zero"] = torch.zeros(5, 5, dtype=torch.float64)
    # the rows that must survive in the result's row space (None: skip that check)
    keep = {
        "zero_row": [0, 1, 3, 4, 5],
        "repeated_rows": [0, 1, 2, 4],
        "scaled_row": [0, 1, 2, 3, 5],
        "linear_combination": [0, 1, 2, 3, 4],
        "all_rows_equal": [0],
        "all_rows_constant": [0],
        "all_zero": None,
        "square_full_rank": [0, 1, 2, 3, 4],
        "square_repeated": [0, 1, 2, 3],
        "square_all_rows_equal": [0],
        "square_all_zero": None,
    }
    return {name: (R.to(device=device, dtype=dtype), keep[name]) for name, R in cases.items()}


RANK_DEFICIENT = list(_rank_deficient_cases(torch.float64, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", RANK_DEFICIENT)
def test_rank_deficient_input_gives_orthonormal_rows(device, case, method, dtype):
    R0, keep = _rank_deficient_cases(dtype, device)[case]
    out = reft_ext.retract_(R0.clone(), method)
    assert out.dtype == dtype and out.shape == R0.shape
    assert torch.isfinite(out).all()
    assert orth_error(out) <= ORTH_TOL[dtype]
    if keep is not None and method in ROW_SPACE_METHODS:
        # the row space of the non-degenerate rows is contained in the result's
        assert row_space_residual(R0[keep], out) <= MATCH_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [3, 4, 6, 8])
@pytest.mark.parametrize("method", METHODS)
def test_square_matrices_of_repeated_rows(device, method, n, dtype):
    """r == d with every row equal (rank one), for 64 random rows retracted in one batch call."""
    gen = torch.Generator().manual_seed(4)
    rows = torch.randn(64, 1, n, dtype=torch.float64, generator=gen)
    R0 = rows.expand(64, n, n).to(device=device, dtype=dtype)
    out = reft_ext.retract_(R0.clone(), method)
    assert torch.isfinite(out).all()
    errors = orth_errors(out)
    bad = (errors > ORTH_TOL[dtype]).sum().item()
    assert bad == 0, f"{bad}/64 not orthonormal, worst error {errors.max().item():.2e}"
    if method in ROW_SPACE_METHODS:
        for i in range(64):  # the repeated row stays in the row space
            assert row_space_residual(R0[i, :1], out[i]) <= MATCH_TOL[dtype]


@pytest.mark.parametrize(
    ("dtype", "kappa"),
    [
        (torch.float64, 1e3),
        (torch.float64, 1e6),
        (torch.float64, 1e9),  # beyond u^-1/2: CholeskyQR2 must fall back to Householder
        (torch.float32, 1e3),
        (torch.float32, 1e5),
    ],
)
@pytest.mark.parametrize("shape", [(4, 64), (8, 32), (6, 6)])
@pytest.mark.parametrize("method", METHODS)
def test_ill_conditioned_input(device, method, shape, dtype, kappa):
    gen = torch.Generator().manual_seed(1)
    R0 = ill_conditioned((5, *shape), kappa, gen).to(device=device, dtype=dtype)
    out = reft_ext.retract_(R0.clone(), method)
    assert torch.isfinite(out).all()
    assert orth_error(out) <= ORTH_TOL[dtype]
    R64, Q = R0.to(torch.float64).cpu(), out.to(torch.float64).cpu()
    # Backward stability: R0 + E = T Q with ‖E‖ ~ u‖R0‖ whatever κ, so the residual of projecting R0
    # onto Q's row space is κ-independent, and T = R0 Qᵀ is lower triangular (cholqr2, qr) with a
    # positive diagonal, up to ‖E‖.
    for i in range(R64.shape[0]):
        assert row_space_residual(R64[i], Q[i]) <= MATCH_TOL[dtype]
    if method in ROW_SPACE_METHODS:
        T = R64 @ Q.mT
        scale = R64.norm(dim=(-2, -1)).max().item()
        assert torch.triu(T, 1).abs().max().item() <= MATCH_TOL[dtype] * scale
        assert (torch.diagonal(T, dim1=-2, dim2=-1) > 0).all()


@pytest.mark.parametrize(
    ("dtype", "low", "high"), [(torch.float64, 6.0, 16.0), (torch.float32, 2.0, 9.0)]
)
@pytest.mark.parametrize("shape", [(3, 3), (4, 16), (8, 32)])
@pytest.mark.parametrize("method", METHODS)
def test_numerically_singular_input_sweep(device, method, shape, dtype, low, high):
    """κ swept through and beyond the CholeskyQR2 breakdown (u^-1/2) up to numerically singular.

    Every matrix must still come back with orthonormal rows: either CholeskyQR2 succeeds or the
    Householder fallback runs. The batch is retracted in one call (equal to separate calls).
    """
    gen = torch.Generator().manual_seed(2)
    exponents = torch.arange(low, high, 0.05).tolist()
    R0 = torch.cat([ill_conditioned((8, *shape), 10.0**e, gen) for e in exponents]).to(
        device=device, dtype=dtype
    )
    out = reft_ext.retract_(R0.clone(), method)
    assert torch.isfinite(out).all()
    errors = orth_errors(out)
    worst = int(errors.argmax())
    assert errors[worst].item() <= ORTH_TOL[dtype], (
        f"κ = 1e{exponents[worst // 8]:.2f}, matrix {worst}: orthonormality error "
        f"{errors[worst].item():.2e}"
    )


# --------------------------------------------------------------------------------------------------
# Batches, strides, low precision


def _mixed_batch(dtype, device):
    gen = torch.Generator().manual_seed(3)
    batch = torch.randn(6, 4, 24, dtype=torch.float64, generator=gen)
    batch[1, 2] = 0  # zero row
    batch[2, 3] = batch[2, 0]  # repeated row
    batch[3] = 0  # all zero
    batch[4] = ill_conditioned((4, 24), 1e6, gen)
    return batch.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_separate_retractions(device, method, dtype):
    batch = _mixed_batch(dtype, device)
    together = reft_ext.retract_(batch.clone(), method)
    separate = torch.stack([reft_ext.retract_(m.clone(), method) for m in batch])
    if device == "cpu":
        assert torch.equal(together, separate)
    else:
        assert max_rel(together, separate) <= MATCH_TOL[dtype]
    single = reft_ext.retract_(batch[:1].clone(), method)  # k = 1
    assert max_rel(single[0], separate[0]) <= (0.0 if device == "cpu" else MATCH_TOL[dtype])


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_input_is_written_back(device, method):
    base = rand((24, 5), torch.float32, device)
    R = base.T  # (5, 24), not contiguous
    assert not R.is_contiguous()
    expected = reft_ext.retract_(R.contiguous().clone(), method)
    out = reft_ext.retract_(R, method)
    assert out is R
    assert torch.equal(R, expected) and torch.equal(base, expected.T)
    # a batch (k, r, d) as a permuted view
    base3 = rand((5, 3, 24), torch.float64, device)
    R3 = base3.permute(1, 0, 2)
    expected3 = reft_ext.retract_(R3.contiguous().clone(), method)
    reft_ext.retract_(R3, method)
    assert torch.equal(R3, expected3)
    # a strided slice: only the selected rows change
    big = rand((8, 24), torch.float64, device)
    untouched = big[1::2].clone()
    reft_ext.retract_(big[::2], method)
    assert orth_error(big[::2]) <= ORTH_TOL[torch.float64]
    assert torch.equal(big[1::2], untouched)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("method", METHODS)
def test_low_precision(device, method, dtype):
    R0 = rand((4, 64), dtype, device)
    out = reft_ext.retract_(R0.clone(), method)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert orth_error(out) <= ORTH_TOL[dtype]
    # computed in float32 and rounded once
    assert torch.equal(out, reft_ext.retract_(R0.float(), method).to(dtype))
    truth = polar_truth(R0) if method == "polar" else qr_truth(R0)
    assert max_rel(out, truth) <= MATCH_TOL[dtype]


# --------------------------------------------------------------------------------------------------
# Bad input and the raw op


@pytest.fixture
def non_finite_error(request, device):
    """What check_finite raises for a matrix holding NaN/Inf: ValueError on CPU; under the
    emulated CUDA kernels, the RuntimeError of their device-side assert (torch._assert_async on
    CPU tensors). On a real GPU that assert ends the process's CUDA context, so the test skips."""
    if device == "cuda":
        pytest.skip("a device-side assert would end this process's CUDA context")
    return RuntimeError if request.node.get_closest_marker("cuda_emulated") else ValueError


@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 8)])
def test_nan_and_inf_raise(device, non_finite_error, shape):
    """The kernels find NaN/Inf in their first pass over each matrix: that matrix is left as it
    was and the call raises (after the batch: the others are retracted)."""
    for bad in (float("nan"), float("inf"), float("-inf")):
        R = rand(shape, torch.float32, device)
        R.view(-1, 8)[1, 4] = bad
        before = R.clone()
        with pytest.raises(non_finite_error, match="NaN or Inf"):
            reft_ext.retract_(R)
        matrices, originals = R.view(-1, *shape[-2:]), before.view(-1, *shape[-2:])
        # view(-1, 8)[1] is row 1 of the first matrix: it is left as it was
        assert torch.equal(matrices[0].nan_to_num(0.0), originals[0].nan_to_num(0.0))
        for i in range(1, matrices.shape[0]):
            assert max_rel(matrices[i], qr_truth(originals[i])) <= MATCH_TOL[torch.float32]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: [[1.0, 0.0]], TypeError, "torch.Tensor"),
        (lambda: torch.randn(5), ValueError, "shape"),
        (lambda: torch.randn(2, 2, 3, 4), ValueError, "shape"),
        (lambda: torch.randn(4, 3), ValueError, "r <= d"),
        (lambda: torch.randn(2, 4, 3), ValueError, "r <= d"),
        (lambda: torch.randn(0, 3), ValueError, "1 <= r"),
        (lambda: torch.ones(2, 3, dtype=torch.int64), ValueError, "float"),
        (lambda: torch.ones(2, 3, dtype=torch.complex64), ValueError, "float"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        reft_ext.retract_(make())


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        reft_ext.retract_(torch.randn(2, 3), "svd")
    with pytest.raises(ValueError, match="method"):
        reft_ext.retract_(torch.randn(2, 3), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5)])
@pytest.mark.parametrize("method", METHODS)
def test_opcheck(device, method, shape, dtype):
    R = rand(shape, dtype, device)
    torch.library.opcheck(torch.ops.reft_ext.retract_.default, (R, method))


def test_retract_marks_its_input_modified(device):
    """A graph that saved R's values before the retraction refuses backward (it used to return a
    silently wrong gradient): retract_ bumps the version counter like any in-place op."""
    R = torch.randn(3, 7, device=device, requires_grad=True)
    X = R * 1.0
    y = (X * X).sum()
    version = X._version
    reft_ext.retract_(X)
    assert X._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, R)


def test_raw_op_checks_its_arguments():
    op = torch.ops.reft_ext.retract_
    with pytest.raises(RuntimeError, match='method must be "cholqr2", "qr" or "polar", got "svd"'):
        op(torch.randn(2, 3), "svd")
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(3, 2).T, "qr")
    with pytest.raises(RuntimeError, match="shape"):
        op(torch.randn(3), "qr")
    with pytest.raises(RuntimeError, match="r <= d"):
        op(torch.randn(3, 2), "qr")
    with pytest.raises(RuntimeError, match="float"):
        op(torch.ones(2, 3, dtype=torch.int32), "qr")
    with pytest.raises(RuntimeError):  # the schema takes the method by name, not by number
        op(torch.randn(2, 3), 0)


def test_raw_op_matches_wrapper(device):
    R0 = rand((3, 4, 9), torch.float64, device)
    for name in METHODS:
        raw = R0.clone()
        assert torch.ops.reft_ext.retract_(raw, name) is None
        assert torch.equal(raw, reft_ext.retract_(R0.clone(), name))


# --------------------------------------------------------------------------------------------------
# project_tangent


@pytest.mark.parametrize("shape", [(4, 32), (3, 5, 12), (6, 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_project_tangent_matches_formula(device, dtype, shape):
    R = rand(shape, dtype, device)  # any R for the formula
    G = rand(shape, dtype, device)
    X = reft_ext.project_tangent(R, G)
    assert X.dtype == dtype and X.shape == shape
    assert max_rel(X, tangent_truth(R, G)) <= MATCH_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_project_tangent_gives_tangent_vectors(device, dtype):
    R = qr_truth(rand((5, 4, 32), torch.float64, device))  # orthonormal rows
    G = rand((5, 4, 32), torch.float64, device)
    X = reft_ext.project_tangent(R.to(dtype), G.to(dtype))
    assert X.dtype == dtype
    Rq, X64 = R.to(dtype).double(), X.double()
    A = X64 @ Rq.mT
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert (0.5 * (A + A.mT)).abs().max().item() <= tol * G.abs().max().item()
    if dtype == torch.float64:
        # a projection: idempotent, and the identity on tangent vectors
        assert max_rel(reft_ext.project_tangent(R, X), X) <= 1e-12
        skew = torch.randn(5, 4, 4, dtype=torch.float64, device=device)
        T = (skew - skew.mT) @ R + G - G @ R.mT @ R  # skew part + normal part: tangent
        assert max_rel(reft_ext.project_tangent(R, T), T) <= 1e-12


def test_project_tangent_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        reft_ext.project_tangent(torch.randn(3, 8), torch.randn(3, 9))


# --------------------------------------------------------------------------------------------------
# keep_orthonormal


def _regression_run(
    dtype,
    method="cholqr2",
    project_grad=False,
    micro_batches=1,
    steps=500,
    device="cpu",
    retract="explicit",
):
    """LoReFT(64, 4) on a fixed random regression, AdamW(lr=1e-2, weight_decay=0.1).

    retract: "explicit" (keep_orthonormal), "auto" (no call: the automatic retraction) or "none"
    (the automatic retraction switched off).

    Returns (worst orthonormality error over all steps, initial loss, final loss, ‖ΔR‖, final R).
    """
    torch.manual_seed(0)
    model = reft_ext.LoReFT(64, 4, dtype=dtype, device=device)
    h = torch.randn(32, 64, dtype=torch.float64).to(device=device, dtype=dtype)
    target = torch.randn(32, 64, dtype=torch.float64).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if retract == "explicit":
        handle = reft_ext.keep_orthonormal(opt, method=method, project_grad=project_grad)
        assert [id(p) for p in handle.params] == [id(model.R)]
    # With keep_orthonormal the automatic retraction stays on: it must skip that optimizer.
    with reft_ext.auto_retraction(retract != "none", method):
        return _train(model, opt, h, target, steps, micro_batches)


def _train(model, opt, h, target, steps, micro_batches):
    R_start = model.R.detach().clone()
    worst = orth_error(model.R)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for hb, tb in zip(h.chunk(micro_batches), target.chunk(micro_batches), strict=True):
            loss = ((model(hb) - tb) ** 2).mean() / micro_batches
            loss.backward()
            total += loss.item()
        losses.append(total)
        opt.step()
        worst = max(worst, orth_error(model.R))  # after EVERY step
    moved = (model.R.detach() - R_start).norm().item()
    return worst, losses[0], losses[-1], moved, model.R.detach().clone()


@pytest.mark.not_emulated  # 500 optimizer steps; the kernel's cases are in tests/cuda_emulation
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_keep_orthonormal_adamw_500_steps(device, method, dtype):
    worst, first, last, moved, _ = _regression_run(dtype, method, device=device)
    assert worst <= ORTH_TOL[dtype]
    assert last < 0.9 * first  # it did train
    assert moved > 0.1  # and R did move on the manifold


@pytest.mark.not_emulated  # 500 optimizer steps
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("project_grad", "micro_batches"), [(True, 1), (False, 2), (True, 2)])
def test_keep_orthonormal_project_grad_and_accumulation(device, dtype, project_grad, micro_batches):
    worst, first, last, moved, _ = _regression_run(
        dtype, project_grad=project_grad, micro_batches=micro_batches, device=device
    )
    assert worst <= ORTH_TOL[dtype]
    assert last < 0.9 * first and moved > 0.1


def test_without_retraction_r_drifts():
    """The control of the tests above: the same run without any retraction leaves the manifold."""
    worst, *_ = _regression_run(torch.float64, steps=50, retract="none")
    assert worst > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_auto_retraction_is_keep_orthonormal_without_the_call(method):
    """No keep_orthonormal call: the global step hook retracts after every step as
    keep_orthonormal does. keep_orthonormal also retracts once at registration (R is orthonormal
    already, to float64 rounding), so the two runs agree to rounding, not bit for bit."""
    worst, first, last, moved, R_auto = _regression_run(
        torch.float64, method, steps=60, retract="auto"
    )
    assert worst <= ORTH_TOL[torch.float64] and last < 0.9 * first and moved > 0.1
    *_, R_explicit = _regression_run(torch.float64, method, steps=60, retract="explicit")
    assert (R_auto - R_explicit).abs().max() <= 1e-12


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),  # bumps no version counter
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    ],
    ids=["sgd", "adamw", "adamw-foreach", "adam-fused", "rmsprop"],
)
def test_auto_retraction_with_every_optimizer(make_optimizer):
    torch.manual_seed(0)
    modules = [reft_ext.LoReFT(48, 4), reft_ext.ConsReFT(48, 2), reft_ext.NoReFT(48, 3)]
    params = [p for m in modules for p in m.parameters()]
    optimizer = make_optimizer(params)
    h, target = torch.randn(16, 48), torch.randn(16, 48)
    for _ in range(20):
        optimizer.zero_grad()
        sum(((m(h) - target) ** 2).mean() for m in modules).backward()
        optimizer.step()
        for m in modules[:2]:
            assert orth_error(m.R) <= ORTH_TOL[torch.float32]
    # NoReFT's R is free (not marked): it moved off the manifold and was left there.
    assert orth_error(modules[2].R) > 1e-3


def test_auto_retraction_switch_and_handle_removal():
    torch.manual_seed(0)
    model = reft_ext.LoReFT(32, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def step():
        optimizer.zero_grad()
        model(torch.randn(8, 32)).square().sum().backward()
        optimizer.step()
        return orth_error(model.R)

    with reft_ext.auto_retraction(False):
        assert not reft_ext.auto_retraction.is_enabled()
        assert step() > 1e-3
    assert reft_ext.auto_retraction.is_enabled()  # the context restored the default
    assert step() <= ORTH_TOL[torch.float32]
    handle = reft_ext.keep_orthonormal(optimizer)
    handle.remove()
    handle.remove()  # twice is harmless
    assert step() <= ORTH_TOL[torch.float32]  # automatic again once the handle is gone
    with pytest.raises(ValueError, match="method must be one of"):
        reft_ext.auto_retraction(True, "gram-schmidt")
    with pytest.raises(TypeError, match="enabled must be a bool"):
        reft_ext.auto_retraction("yes")


def test_registration_retracts_and_remove_detaches(device):
    torch.manual_seed(0)
    model = reft_ext.LoReFT(16, 3, device=device)
    with torch.no_grad():
        model.R.add_(torch.randn_like(model.R))  # off the manifold
    expected = reft_ext.retract_(model.R.detach().clone())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = reft_ext.keep_orthonormal(opt)
    assert torch.equal(model.R.detach(), expected)  # retracted at registration

    h = torch.randn(8, 16, device=device)
    model(h).square().sum().backward()
    R_before, G = model.R.detach().clone(), model.R.grad.clone()
    opt.step()
    assert max_rel(model.R, reft_ext.retract_(R_before - 0.1 * G)) <= 1e-6

    handle.remove()
    opt.zero_grad()
    model(h).square().sum().backward()
    R_before, G = model.R.detach().clone(), model.R.grad.clone()
    with reft_ext.auto_retraction(False):  # (else the automatic retraction takes over)
        opt.step()
    assert max_rel(model.R, R_before - 0.1 * G) <= 1e-6  # plain SGD step, no retraction
    assert orth_error(model.R) > 1e-3
    handle.remove()  # idempotent


@pytest.mark.parametrize("method", METHODS)
def test_project_grad_step_is_riemannian_sgd(device, method):
    """SGD + project_grad: R ← retract(R − lr·(G − sym(G Rᵀ) R)), checked with the float64 truth."""
    torch.manual_seed(0)
    model = reft_ext.LoReFT(16, 3, dtype=torch.float64, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reft_ext.keep_orthonormal(opt, method=method, project_grad=True)
    model(torch.randn(8, 16, dtype=torch.float64, device=device)).square().sum().backward()
    R, G = model.R.detach().clone(), model.R.grad.clone()
    opt.step()
    tangent = tangent_truth(R, G)
    assert max_rel(model.R.grad, tangent) <= 1e-12  # the grad was replaced before the step
    moved = R - 0.05 * tangent
    truth = polar_truth(moved) if method == "polar" else qr_truth(moved)
    assert max_rel(model.R, truth) <= 1e-12
    # W and b got the plain gradient step
    assert model.W.grad is not None


def test_grouped_retraction_equals_separate(device):
    """Parameters of equal shape are retracted in one batched call: same values as one by one."""
    torch.manual_seed(0)
    models = [reft_ext.LoReFT(16, 3, device=device) for _ in range(3)]
    models.append(reft_ext.LoBiReFT(16, 2, device=device))
    copies = [type(m)(16, m.rank, device=device) for m in models]
    for m, c in zip(models, copies, strict=True):
        c.load_state_dict(m.state_dict())
    params = [p for m in models for p in m.parameters()]
    copy_params = [p for c in copies for p in c.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    opt_copy = torch.optim.Adam(copy_params, lr=0.05)
    handle = reft_ext.keep_orthonormal(opt)
    assert {id(p) for p in handle.params} == {id(m.R) for m in models}
    for c in copies:
        reft_ext.retract_(c.R.data)
    h = torch.randn(5, 16, device=device)
    with reft_ext.auto_retraction(False):  # the copies are retracted by hand, one by one
        for _ in range(3):
            for group, optimizer in ((models, opt), (copies, opt_copy)):
                optimizer.zero_grad()
                sum(m(h).square().sum() for m in group).backward()
                optimizer.step()
            for c in copies:
                reft_ext.retract_(c.R.data)
    for m, c in zip(models, copies, strict=True):
        assert max_rel(m.R, c.R) <= (0.0 if device == "cpu" else 1e-6)
        assert orth_error(m.R) <= ORTH_TOL[torch.float32]


def test_explicit_params_and_mark_stiefel(device):
    R = torch.nn.Parameter(torch.randn(3, 10, device=device))
    other = torch.nn.Parameter(torch.randn(2, 10, device=device))
    opt = torch.optim.SGD([R, other], lr=0.1)
    with pytest.raises(ValueError, match="mark_stiefel"):
        reft_ext.keep_orthonormal(opt)
    handle = reft_ext.keep_orthonormal(opt, params=[R])
    assert orth_error(R) <= ORTH_TOL[torch.float32]
    assert orth_error(other) > 0.1  # not selected
    handle.remove()
    assert reft_ext.mark_stiefel(other) is other and is_stiefel(other) and not is_stiefel(R)
    handle = reft_ext.keep_orthonormal(opt)
    assert [id(p) for p in handle.params] == [id(other)]
    assert orth_error(other) <= ORTH_TOL[torch.float32]


def test_keep_orthonormal_retracts_groups_added_later(device):
    """A parameter group added after the call, or a parameter swapped into a group, used to be
    left to drift (‖RRᵀ − I‖ ≈ 0.2 after 3 steps)."""
    first = reft_ext.LoReFT(16, 3, device=device)
    optimizer = torch.optim.AdamW(first.parameters(), lr=0.1)
    reft_ext.keep_orthonormal(optimizer)
    later, swapped = reft_ext.LoReFT(16, 3, device=device), reft_ext.LoReFT(16, 2, device=device)
    optimizer.add_param_group({"params": list(later.parameters())})
    optimizer.param_groups[0]["params"][0] = swapped.R
    h = torch.randn(8, 16, device=device)
    for _ in range(3):
        optimizer.zero_grad()
        loss = (later(first(h)) - h).square().sum() + swapped(h).square().sum()
        loss.backward()
        optimizer.step()
    for R in (later.R, swapped.R):
        assert orth_error(R) <= ORTH_TOL[torch.float32]


def test_keep_orthonormal_and_project_tangent_argument_types():
    module = reft_ext.LoReFT(16, 3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="params must be a list"):
        reft_ext.keep_orthonormal(optimizer, params=module.R)
    R = module.R.detach()
    with pytest.raises(TypeError, match="G must be a floating-point tensor, got torch.int64"):
        reft_ext.project_tangent(R, torch.ones(3, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="G must be a floating-point tensor, got list"):
        reft_ext.project_tangent(R, [[0.0] * 16] * 3)


def test_keep_orthonormal_bad_arguments():
    model = reft_ext.LoReFT(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="method"):
        reft_ext.keep_orthonormal(opt, method="householder")
    with pytest.raises(ValueError, match="not in the optimizer"):
        reft_ext.keep_orthonormal(opt, params=[torch.nn.Parameter(torch.randn(2, 8))])
    with pytest.raises(ValueError, match=r"\(r, d\)"):
        reft_ext.keep_orthonormal(opt, params=[model.b])
    tall = torch.nn.Parameter(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(r, d\)"):
        reft_ext.keep_orthonormal(torch.optim.SGD([tall], lr=0.1), params=[tall])
    free = reft_ext.NoReFT(8, 2)
    with pytest.raises(ValueError, match="mark_stiefel"):
        reft_ext.keep_orthonormal(torch.optim.SGD(free.parameters(), lr=0.1))


def test_keep_orthonormal_low_precision_params(device):
    torch.manual_seed(0)
    model = reft_ext.LoReFT(32, 4, dtype=torch.bfloat16, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    reft_ext.keep_orthonormal(opt)
    h = torch.randn(16, 32, device=device).bfloat16()
    for _ in range(20):
        opt.zero_grad()
        model(h).float().square().mean().backward()
        opt.step()
        assert model.R.dtype == torch.bfloat16
        assert orth_error(model.R) <= ORTH_TOL[torch.bfloat16]


# --------------------------------------------------------------------------------------------------
# Extreme values and in-place rules (issue 12)


# Scales where the result used to be non-finite or not the closest matrix: float32 subnormal, the
# ranges where polar's scaling overflowed (1e-15..1e-10, 1e11..1e15), float64 subnormal.
EXTREME_SCALES = {
    torch.float32: [1e-40, 1e-42, 1e-12, 1e13, 1e30],
    torch.bfloat16: [1e-40, 1e30],
    torch.float64: [1e-310, 1e-200, 1e200],
}


@pytest.mark.parametrize(
    ("dtype", "scale"), [(dt, s) for dt, scales in EXTREME_SCALES.items() for s in scales]
)
@pytest.mark.parametrize("shape", [(1, 7), (3, 7), (2, 4, 33)])
@pytest.mark.parametrize("method", METHODS)
def test_extreme_scales_match_the_float64_truth(device, method, shape, dtype, scale):
    """The truth is taken from the input as stored (a subnormal keeps only a few bits), in
    float64, where these scales are harmless for torch.linalg."""
    R0 = (rand(shape, torch.float64, device) * scale).to(dtype)
    assert R0.abs().max() > 0  # not flushed to zero
    stored = R0.double() / R0.double().abs().max()  # exact: the truth of a rescaled input
    truth = polar_truth(stored) if method == "polar" else qr_truth(stored)
    out = reft_ext.retract_(R0.clone(), method)
    assert torch.isfinite(out).all()
    assert orth_error(out) <= ORTH_TOL[dtype]
    assert max_rel(out, truth) <= 10 * MATCH_TOL[dtype]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_matrix_comes_back_all_nan_without_the_check(device, method, bad):
    """With check_finite=False a matrix holding NaN or Inf becomes all NaN (the others of the
    batch are retracted as usual)."""
    R0 = rand((3, 4, 20), torch.float32, device)
    R0[1, 2, 5] = bad
    out = reft_ext.retract_(R0.clone(), method, check_finite=False)
    assert torch.isnan(out[1]).all()
    for i in (0, 2):
        truth = polar_truth(R0[i]) if method == "polar" else qr_truth(R0[i])
        assert max_rel(out[i], truth) <= MATCH_TOL[torch.float32]


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(1, 4, 8).expand(3, 4, 8),  # stride 0
        lambda: torch.randn(40).as_strided((3, 4, 8), (4, 8, 1)),  # matrices overlap
        lambda: torch.randn(4, 1).expand(4, 6),  # rows share memory
    ],
    ids=["expanded-batch", "overlapping-as-strided", "expanded-columns"],
)
def test_r_whose_elements_share_memory_is_refused(make):
    R = make()
    before = R.clone()
    with pytest.raises(ValueError, match="R has elements that share memory"):
        reft_ext.retract_(R)
    assert torch.equal(R, before)  # untouched


def test_non_overlapping_strided_r_is_retracted_in_place():
    """A layout the overlap check cannot decide cheaply, but which does not overlap."""
    storage = torch.randn(200, dtype=torch.float64)
    R = storage.as_strided((2, 3, 8), (50, 9, 1))
    truth = qr_truth(R.clone())
    assert reft_ext.retract_(R) is R
    assert max_rel(R, truth) <= MATCH_TOL[torch.float64]
    assert max_rel(storage.as_strided((2, 3, 8), (50, 9, 1)), truth) <= MATCH_TOL[torch.float64]


def test_raw_op_refuses_a_leaf_that_requires_grad_outside_no_grad(device):
    R = torch.randn(3, 7, requires_grad=True)
    before = R.detach().clone()
    with pytest.raises(RuntimeError, match="R is a leaf tensor that requires grad"):
        torch.ops.reft_ext.retract_(R, "cholqr2")
    assert torch.equal(R.detach(), before)
    with torch.no_grad():
        torch.ops.reft_ext.retract_(R, "cholqr2")
    assert max_rel(R, qr_truth(before)) <= MATCH_TOL[torch.float32]
    reft_ext.retract_(R)  # the wrapper retracts under no_grad itself


def test_inference_tensor_is_retracted_only_in_inference_mode(device):
    with torch.inference_mode():
        R = torch.randn(3, 7)
    before = R.clone()
    for retract in (lambda: reft_ext.retract_(R), lambda: torch.ops.reft_ext.retract_(R, "qr")):
        with pytest.raises(RuntimeError, match="R is an inference tensor"):
            retract()
    assert torch.equal(R, before)
    with torch.inference_mode():
        reft_ext.retract_(R)
    assert max_rel(R, qr_truth(before)) <= MATCH_TOL[torch.float32]


# --------------------------------------------------------------------------------------------------
# retract_list_: the multi-tensor form


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_retract_list_equals_retract_on_each_tensor(device, method, dtype):
    """Mixed shapes (single matrices, batches, a non-contiguous view) in one call: each result is
    bit for bit what retract_ gives on that tensor alone, and matches the float64 truth."""
    shapes = [(3, 40), (2, 4, 33), (1, 1), (5, 17), (3, 2, 64)]
    Rs = [rand(shape, dtype, device) for shape in shapes]
    Rs.append(rand((40, 3), dtype, device).T)  # non-contiguous (3, 40)
    alone = [reft_ext.retract_(R.clone(), method) for R in Rs]
    together = [R.clone() for R in Rs[:-1]] + [Rs[-1].clone().T.contiguous().T]
    assert reft_ext.retract_list_(together, method) is together
    for got, want, original in zip(together, alone, Rs, strict=True):
        assert torch.equal(got, want)
        truth = polar_truth(original) if method == "polar" else qr_truth(original)
        assert max_rel(got, truth) <= MATCH_TOL[dtype]


def test_retract_list_groups_dtypes_and_takes_empty_lists(device):
    Rs = [rand((3, 20), torch.float64, device), rand((2, 9), torch.float32, device)]
    truths = [qr_truth(R) for R in Rs]
    reft_ext.retract_list_(Rs)
    for R, truth in zip(Rs, truths, strict=True):
        assert max_rel(R, truth) <= MATCH_TOL[R.dtype]
    assert reft_ext.retract_list_([]) == []


@pytest.mark.parametrize(
    ("Rs", "error", "match"),
    [
        (lambda: torch.randn(3, 5), TypeError, "Rs must be a list"),
        (lambda: [torch.randn(3, 5), "R"], TypeError, r"Rs\[1\] must be a torch.Tensor"),
        (lambda: [torch.randn(3, 5), torch.randn(6, 5)], ValueError, r"Rs\[1\] must have shape"),
        (lambda: [torch.ones(3, 5, dtype=torch.int64)], ValueError, r"Rs\[0\] must be"),
        (lambda: [torch.randn(1, 5).expand(3, 5)], ValueError, r"Rs\[0\] has elements that"),
    ],
)
def test_retract_list_bad_arguments_name_the_tensor(Rs, error, match):
    with pytest.raises(error, match=match):
        reft_ext.retract_list_(Rs())
    with pytest.raises(ValueError, match="method must be one of"):
        reft_ext.retract_list_([], "svd")


def test_raw_retract_list_checks_every_tensor():
    op = torch.ops.reft_ext.retract_list_
    with pytest.raises(RuntimeError, match=r"Rs\[1\] must have Rs\[0\]'s dtype and device"):
        op([torch.randn(3, 5), torch.randn(3, 5, dtype=torch.float64)], "qr")
    with pytest.raises(RuntimeError, match=r"Rs\[1\]: R must be contiguous"):
        op([torch.randn(3, 5), torch.randn(5, 3).T], "qr")
    with pytest.raises(RuntimeError, match="method must be"):
        op([torch.randn(3, 5)], "svd")
    R = torch.randn(2, 3, 5)
    torch.library.opcheck(op.default, ([R[0].clone(), R.clone()], "cholqr2", True))


def test_retract_list_refuses_non_finite_matrices(device, non_finite_error):
    Rs = [rand((3, 8), torch.float32, device), rand((2, 3, 8), torch.float32, device)]
    Rs[1][1, 0, 0] = float("nan")
    before = [R.clone() for R in Rs]
    with pytest.raises(non_finite_error, match="NaN or Inf"):
        reft_ext.retract_list_(Rs)
    assert torch.equal(Rs[1][1].nan_to_num(), before[1][1].nan_to_num())  # left as it was
    assert max_rel(Rs[0], qr_truth(before[0])) <= MATCH_TOL[torch.float32]
    out = reft_ext.retract_list_([R.clone() for R in before], check_finite=False)
    assert torch.isnan(out[1][1]).all() and not torch.isnan(out[1][0]).any()
