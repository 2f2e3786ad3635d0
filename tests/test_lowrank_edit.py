"""Tests of the fused low-rank edits against independent float64 references.

The float64 truth (tests/truth.py) is written with einsum (not taken from reft_ext), and its
gradients come from autograd of that composite. ``reft_ext.reference`` is used only as the
low-precision yardstick.
"""

import os
import subprocess
import sys

import pytest
import torch
from cpu_variants import VARIANTS, best_variant, run_forced
from truth import (
    assert_close_rel,
    max_abs_err,
    orth_error,
    truth_direft,
    truth_loreft,
    truth_lowrank_edit,
    truth_lowrank_edit_act,
    truth_multi_and_grads,
)

import reft_ext
from reft_ext import reference

OPS = {
    "lowrank_edit": (reft_ext.lowrank_edit, truth_lowrank_edit, reference.lowrank_edit, ("P", "Q")),
    "loreft": (reft_ext.loreft, truth_loreft, reference.loreft, ("R", "W")),
    "direft": (reft_ext.direft, truth_direft, reference.direft, ("R", "W")),
}
OP_NAMES = list(OPS)


def _identity(x):
    return x


def fused_and_truth(op, leaves, view=_identity, grad_out=None):
    """Output and gradients of every leaf, fused and in float64 truth.

    ``leaves`` = (h_base, A, B, b); the op sees ``view(h_base)``. ``grad_out`` defaults to a random
    tensor like the output. Returns ((out, grads), (out64, grads64), grad_out).
    """
    fused, truth = OPS[op][0], OPS[op][1]
    out = fused(view(leaves[0]), *leaves[1:])
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64 = truth(view(leaves64[0]), *leaves64[1:])
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    return (out, grads), (out64.detach(), grads64), grad_out


def check_against_truth(op, leaves, view=_identity, grad_out=None):
    """Values, dtypes and all gradients of ``op`` on ``leaves`` match the float64 truth."""
    (out, grads), (out64, grads64), _ = fused_and_truth(op, leaves, view, grad_out)
    h = view(leaves[0])
    assert out.shape == h.shape and out.dtype == h.dtype and out.device == h.device
    assert_close_rel(out, out64)
    for leaf, g, g64 in zip(leaves, grads, grads64, strict=True):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert_close_rel(g, g64)


# --------------------------------------------------------------------------------------------------
# Values and gradients


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize(
    "dtype, param_dtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.float64, torch.float32),
        (torch.float64, (torch.float32, torch.float64, torch.float32)),
    ],
    ids=["fp64", "fp32", "fp64-h-fp32-params", "fp64-h-mixed-params"],
)
def test_matches_float64_truth(device, op, dtype, param_dtype, make_inputs):
    """Output and the gradients of h and every parameter match the float64 composite."""
    leaves = make_inputs((3, 5, 40), 4, dtype, param_dtype, device)
    check_against_truth(op, leaves)


def test_reference_module_matches_truth(make_inputs):
    """reft_ext.reference in float64 agrees with the independent truth (it is the yardstick)."""
    h, A, B, b = make_inputs((4, 6, 19), 3, torch.float64, requires_grad=False)
    for _, truth, ref, _ in OPS.values():
        assert_close_rel(ref(h, A, B, b), truth(h, A, B, b))


@pytest.mark.parametrize("op", OP_NAMES)
def test_gradcheck(device, op, make_inputs):
    """torch.autograd.gradcheck in float64 for every input of the public function."""
    inputs = make_inputs((2, 3, 7), 3, torch.float64, device=device)
    assert torch.autograd.gradcheck(OPS[op][0], inputs)


@pytest.mark.parametrize("op", OP_NAMES)
def test_gradcheck_non_contiguous(device, op, make_inputs):
    """gradcheck with a transposed (non-contiguous) h."""
    h, A, B, b = make_inputs((7, 3), 2, torch.float64, device=device)
    h_t = h.detach().T.contiguous().T.requires_grad_()  # (7, 3) with strides (1, 7)
    assert not h_t.is_contiguous()
    assert torch.autograd.gradcheck(OPS[op][0], (h_t, A, B, b))


# --------------------------------------------------------------------------------------------------
# Raw ops


ALL_GRADS = [True] * 4  # lowrank_edit_backward's output_mask: (h, P, Q, b)

RAW_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


def _raw_inputs(dtype, acc, device, N=5, d=13, r=3):
    h = torch.randn(N, d, device=device, dtype=torch.float64).to(dtype)
    P = torch.randn(r, d, device=device, dtype=acc)
    Q = torch.randn(r, d, device=device, dtype=acc)
    b = torch.randn(r, device=device, dtype=acc)
    return h, P, Q, b


@pytest.mark.parametrize("dtype, acc", RAW_DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
def test_opcheck_forward(device, dtype, acc):
    """torch.library.opcheck on lowrank_edit_forward (schema, fake kernel, AOT dispatch)."""
    torch.library.opcheck(
        torch.ops.reft_ext.lowrank_edit_forward.default, _raw_inputs(dtype, acc, device)
    )


@pytest.mark.parametrize("dtype, acc", RAW_DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
def test_opcheck_backward(device, dtype, acc):
    """torch.library.opcheck on lowrank_edit_backward."""
    h, P, Q, b = _raw_inputs(dtype, acc, device)
    _, z = torch.ops.reft_ext.lowrank_edit_forward(h, P, Q, b)
    grad_out = torch.randn_like(h)
    torch.library.opcheck(
        torch.ops.reft_ext.lowrank_edit_backward.default, (grad_out, h, P, Q, z, ALL_GRADS)
    )


def test_raw_ops_match_truth(device):
    """The raw forward returns (h + z Q, z = h Pᵀ + b); the raw backward returns the four grads."""
    h, P, Q, b = _raw_inputs(torch.float64, torch.float64, device, N=9, d=21, r=4)
    out, z = torch.ops.reft_ext.lowrank_edit_forward(h, P, Q, b)
    assert_close_rel(z, h @ P.T + b)
    assert_close_rel(out, truth_lowrank_edit(h, P, Q, b))
    g = torch.randn_like(h)
    grads = torch.ops.reft_ext.lowrank_edit_backward(g, h, P, Q, z, ALL_GRADS)
    leaves = [t.clone().requires_grad_() for t in (h, P, Q, b)]
    expected = torch.autograd.grad(truth_lowrank_edit(*leaves), leaves, g)
    for got, want in zip(grads, expected, strict=True):
        assert_close_rel(got, want)


MASKS = [[bool(bits >> i & 1) for i in range(4)] for bits in range(16)]


@pytest.mark.parametrize("dtype, acc", RAW_DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize(
    "mask", MASKS, ids=["".join("hPQb"[i] for i in range(4) if m[i]) or "none" for m in MASKS]
)
def test_raw_backward_output_mask(device, dtype, acc, mask):
    """Each gradient the mask asks for is bit for bit the one computed with all four asked for
    (itself the float64 truth, within fp32/fp64 tolerance); one not asked for is empty."""
    h, P, Q, b = _raw_inputs(dtype, acc, device, N=133, d=40, r=3)  # a partial group tail
    _, z = torch.ops.reft_ext.lowrank_edit_forward(h, P, Q, b)
    g = torch.randn_like(h)
    grads = torch.ops.reft_ext.lowrank_edit_backward(g, h, P, Q, z, mask)
    full = torch.ops.reft_ext.lowrank_edit_backward(g, h, P, Q, z, ALL_GRADS)
    leaves = [t.double().requires_grad_() for t in (h, P, Q, b)]
    truths = torch.autograd.grad(truth_lowrank_edit(*leaves), leaves, g.double())
    for wanted, got, every, truth in zip(mask, grads, full, truths, strict=True):
        if wanted:
            assert torch.equal(got, every)
        if every.dtype in (torch.float32, torch.float64):
            assert_close_rel(every, truth)
        if not wanted:
            assert got.shape == (0,) and got.dtype == every.dtype


class _RecordMasks(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output_mask of every lowrank_edit_backward call made inside it."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.reft_ext.lowrank_edit_backward.default:
            self.masks.append(list(args[5]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "needs", [(True, True), (False, True), (True, False)], ids=["all", "frozen-h", "frozen-params"]
)
def test_raw_forward_is_differentiable_and_skips_unneeded_grads(device, needs):
    """torch.ops.reft_ext.lowrank_edit_forward has its own autograd formula: gradients equal the
    float64 truth, and the backward op is asked only for the gradients autograd needs (no ∂h pass
    for an h from frozen embeddings, no parameter sums for frozen parameters)."""
    h_needs, params_need = needs
    h, P, Q, b = _raw_inputs(torch.float64, torch.float64, device, N=11, d=19, r=2)
    h.requires_grad_(h_needs)
    for t in (P, Q, b):
        t.requires_grad_(params_need)
    g = torch.randn_like(h)
    with _RecordMasks() as recorder:
        out, z = torch.ops.reft_ext.lowrank_edit_forward(h, P, Q, b)
        assert not z.requires_grad
        out.backward(g)
    assert recorder.masks == [[h_needs, params_need, params_need, params_need]]
    leaves = [t.detach().requires_grad_() for t in (h, P, Q, b)]
    truths = torch.autograd.grad(truth_lowrank_edit(*leaves), leaves, g)
    for t, truth in zip((h, P, Q, b), truths, strict=True):
        if t.requires_grad:
            assert_close_rel(t.grad, truth)
        else:
            assert t.grad is None


def test_raw_forward_gradcheck(device):
    """gradcheck straight on the raw op (no Python autograd.Function around it)."""
    h, P, Q, b = (t.requires_grad_() for t in _raw_inputs(torch.float64, torch.float64, device))

    def out_only(*args):
        return torch.ops.reft_ext.lowrank_edit_forward(*args)[0]

    assert torch.autograd.gradcheck(out_only, (h, P, Q, b))
    assert torch.autograd.gradcheck(out_only, (h.detach(), P, Q, b.detach()))


@pytest.mark.parametrize(
    "requires_grad", [(True,) * 4, (False, True, True, True), (True, False, False, False)]
)
def test_opcheck_forward_with_gradients(device, requires_grad):
    """opcheck's autograd-registration checks, with and without gradients on h and parameters."""
    inputs = [
        t.requires_grad_(wanted)
        for t, wanted in zip(
            _raw_inputs(torch.float32, torch.float32, device), requires_grad, strict=True
        )
    ]
    torch.library.opcheck(torch.ops.reft_ext.lowrank_edit_forward.default, inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [37, 64])
def test_low_precision_rows_round_like_torch(device, dtype, d):
    """Rows are widened exactly and rounded to nearest even as torch rounds, specials included.

    With P = 0, b = 1 and r = 1 the kernel's output is h + q rounded once to float32 and then to
    h's dtype: the same two roundings as ``(h.float() + q).to(dtype)``, so the results must be
    equal bit for bit (NaN where torch gives NaN). Non-finite values go in q, not in h: in h they
    would make z = h Pᵀ + b NaN for the whole row, as IEEE arithmetic says.
    """
    N = 9  # two blocks of four rows and a tail row
    info = torch.finfo(dtype)
    h = torch.randn(N, d, device=device).to(dtype)
    h[0, :5] = torch.tensor([info.max, -info.max, info.tiny / 8, -0.0, info.max], dtype=dtype)
    q = (torch.randn(1, d, device=device) * 2.0**-7).to(dtype).float()  # between h's neighbours
    q[0, :8] = torch.tensor([0, 0, 0, 0, info.max, float("nan"), float("inf"), -float("inf")])
    P = torch.zeros(1, d, device=device)
    b = torch.ones(1, device=device)
    out, _ = torch.ops.reft_ext.lowrank_edit_forward(h, P, q, b)
    expected = (h.float() + q).to(dtype)  # row 0, column 4: max + max overflows to inf
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan], expected[~nan])
    # Widening is exact: with the edit switched off (Q = 0) the output is h itself.
    out, _ = torch.ops.reft_ext.lowrank_edit_forward(h, P, torch.zeros_like(q), b)
    assert torch.equal(out, h)


_VARIANT_SCRIPT = """
import sys, torch, reft_ext
torch.manual_seed(0)
inputs = torch.load(sys.argv[1])
ops = torch.ops.reft_ext
results = []
for h, P, Q, b, g, P2, b2, adapter in inputs:
    out, z = ops.lowrank_edit_forward(h, P, Q, b)
    plain = (out, *ops.lowrank_edit_backward(g, h, P, Q, z, [True] * 4))
    out, v, z = ops.lowrank_edit_act_forward(h, P2, Q, b2, "gelu")
    act = (out, *ops.lowrank_edit_act_backward(g, h, P2, Q, v, z, "gelu", [True] * 4))
    Pm, Qm, bm = (torch.stack([t, 2 * t, -t]) for t in (P, Q, b))
    out, z = ops.lowrank_edit_multi_forward(h, Pm, Qm, bm, adapter)
    multi = (out, *ops.lowrank_edit_multi_backward(g, h, Pm, Qm, z, adapter, [True] * 4))
    R = torch.randn(2, P.shape[0], P.shape[1], dtype=P.dtype)
    reft_ext.retract_(R)
    results.append((plain, act, multi, R))
torch.save(results, sys.argv[2])
"""

# Shapes that reach every row and column blocking of the CPU kernels (csrc/cpu/edit_rows.h): row
# blocks and tail rows, 4-, 2- and 1-strip edit steps and tail columns, several column chunks,
# rank groups of 16 and their tails, projections 4, 2 and 1 ranks per sweep (r = 7).
VARIANT_SHAPES = [(9, 37, 3), (4, 64, 1), (6, 16, 5), (5, 120, 17), (11, 1037, 33), (10, 200, 7)]


def _variant_inputs(dtype, acc):
    """Per VARIANT_SHAPES entry, _VARIANT_SCRIPT's inputs: h, P, Q, b, an upstream gradient, the
    activated edit's P and b (2r rows) and a row-to-adapter map over 3 adapters and -1."""
    inputs = []
    for N, d, r in VARIANT_SHAPES:
        h, P, Q, b = _raw_inputs(dtype, acc, "cpu", N=N, d=d, r=r)
        P2, b2 = torch.randn(2 * r, d, dtype=acc), torch.randn(2 * r, dtype=acc)
        adapter = torch.tensor([(-1, 0, 1, 2, 1)[i % 5] for i in range(N)])
        inputs.append((h, P, Q, b, torch.randn_like(h), P2, b2, adapter))
    return inputs


@pytest.mark.parametrize("dtype, acc", RAW_DTYPES[:3], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_kernel_variants_match_truth(tmp_path, variant, dtype, acc):
    """Each build of the CPU kernels (portable, AVX2, AVX-512; forced in a child process) gives the
    float64 truth for the plain, activated and multi-adapter ops, forward and backward, and
    orthonormal rows from the retraction."""
    inputs = _variant_inputs(dtype, acc)
    results = run_forced(variant, _VARIANT_SCRIPT, inputs, tmp_path)
    for (h, P, Q, b, g, P2, b2, adapter), (plain, act, multi, R) in zip(
        inputs, results, strict=True
    ):
        leaves = [t.double().requires_grad_() for t in (h, P, Q, b)]
        expected = truth_lowrank_edit(*leaves)
        plain_truth = (expected.detach(), *torch.autograd.grad(expected, leaves, g.double()))
        r = Q.shape[0]
        leaves = [t.double().requires_grad_() for t in (h, P2, Q, b2)]
        h64, P64, Q64, b64 = leaves
        expected = truth_lowrank_edit_act(h64, P64[:r], b64[:r], Q64, "gelu", S=P64[r:], c=b64[r:])
        act_truth = (expected.detach(), *torch.autograd.grad(expected, leaves, g.double()))
        Pm, Qm, bm = (torch.stack([t, 2 * t, -t]) for t in (P, Q, b))
        out64, grads64 = truth_multi_and_grads((h, Pm, Qm, bm), adapter, g)
        for got_all, want_all in [
            (plain, plain_truth),
            (act, act_truth),
            (multi, (out64, *grads64)),
        ]:
            for got, want in zip(got_all, want_all, strict=True):
                # bfloat16 results (out, ∂h) carry one rounding to 8 significant bits.
                assert_close_rel(got, want, rel=2.0**-7 if got.dtype == torch.bfloat16 else None)
        assert orth_error(R) < 1e-5


@pytest.mark.parametrize("dtype, acc", RAW_DTYPES[:3], ids=["fp32", "fp64", "bf16"])
def test_avx2_and_avx512_kernels_give_the_same_bits(tmp_path, dtype, acc):
    """The AVX-512 build's wider register tiles add every sum's terms in the AVX2 build's order:
    the same bits for the plain, activated and multi-adapter edits, forward and backward (README:
    the edit's results do not depend on the variant, but for the portable build, which has no
    FMA). (The retraction, compiled per variant too, is only held to the truth.)"""
    inputs = _variant_inputs(dtype, acc)
    avx2 = run_forced("avx2", _VARIANT_SCRIPT, inputs, tmp_path)
    avx512 = run_forced("avx512", _VARIANT_SCRIPT, inputs, tmp_path)
    for case2, case512 in zip(avx2, avx512, strict=True):
        for outputs2, outputs512 in zip(case2[:3], case512[:3], strict=True):
            for a, b in zip(outputs2, outputs512, strict=True):
                assert torch.equal(a, b)


def test_cpu_kernels_default_is_the_best_this_cpu_runs(tmp_path):
    """Unforced, the library runs the most capable variant /proc/cpuinfo's flags allow."""
    env = {k: v for k, v in os.environ.items() if k != "REFT_EXT_CPU_KERNELS"}
    script = "import reft_ext; print(reft_ext.cpu_kernels())"
    chosen = (
        subprocess.run(
            [sys.executable, "-c", script], env=env, check=True, timeout=60, capture_output=True
        )
        .stdout.decode()
        .strip()
    )
    assert chosen == best_variant()


def test_unknown_cpu_kernels_name_is_an_error(tmp_path):
    """REFT_EXT_CPU_KERNELS with a name that is not a variant fails naming the choices."""
    script = (
        "import torch, reft_ext\n"
        "try:\n"
        "    x = torch.randn(2, 8)\n"
        "    reft_ext.loreft(x, torch.randn(1, 8), torch.randn(1, 8), torch.randn(1))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "REFT_EXT_CPU_KERNELS": "sse9"},
        check=True,
        timeout=60,
        capture_output=True,
    )
    message = result.stdout.decode()
    assert "REFT_EXT_CPU_KERNELS must be portable, avx2 or avx512" in message and "sse9" in message


# --------------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_matches_eager(device, make_inputs):
    """loreft inside torch.compile(fullgraph=True) (default backend): same values and grads."""

    def step(h, R, W, b):
        out = reft_ext.loreft(torch.tanh(h), R, W, b)
        return (out * out).sum(-1).sqrt().mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    leaves = make_inputs((4, 6, 32), 3, torch.float32, device=device)
    eager_loss = step(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, ge in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Low precision


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("params", ["fp32", "h-dtype"])
def test_low_precision_no_worse_than_naive(device, op, dtype, params, make_inputs):
    """bf16/fp16 h: fused error (vs float64) of out and grad_h is ≤ 2× the naive composite's."""
    param_dtype = torch.float32 if params == "fp32" else dtype
    leaves = make_inputs((6, 50, 100), 8, dtype, param_dtype, device)
    (out, grads), (out64, grads64), grad_out = fused_and_truth(op, leaves)
    naive = OPS[op][2](*leaves)
    (naive_grad_h,) = torch.autograd.grad(naive, leaves[0], grad_out)
    assert out.dtype == dtype and grads[0].dtype == dtype
    slack = 1e-6
    assert max_abs_err(out, out64) <= 2 * max_abs_err(naive, out64) + slack
    assert max_abs_err(grads[0], grads64[0]) <= 2 * max_abs_err(naive_grad_h, grads64[0]) + slack


@pytest.mark.parametrize(
    "dtype, param_dtype",
    [
        (torch.bfloat16, (torch.float32,) * 3),
        (torch.bfloat16, (torch.bfloat16,) * 3),
        (torch.bfloat16, (torch.float32, torch.bfloat16, torch.float32)),
        (torch.float16, (torch.float16, torch.float32, torch.float16)),
        (torch.float32, (torch.float32,) * 3),
        (torch.float64, (torch.float32, torch.float64, torch.float32)),
    ],
    ids=["bf16-fp32", "bf16-bf16", "bf16-mixed", "fp16-mixed", "fp32-fp32", "fp64-mixed"],
)
@pytest.mark.parametrize("op", OP_NAMES)
def test_gradient_dtypes(device, op, dtype, param_dtype, make_inputs):
    """Output has h's dtype; each gradient has its own input's dtype and shape."""
    leaves = make_inputs((3, 4, 24), 2, dtype, param_dtype, device)
    out = OPS[op][0](*leaves)
    assert out.dtype == dtype and out.shape == leaves[0].shape
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    for leaf, g in zip(leaves, grads, strict=True):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape and g.device == leaf.device
        assert torch.isfinite(g).all() and g.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Layouts and shapes

D = 24
LAYOUTS = {
    "1d": ((D,), _identity),
    "3d": ((3, 4, D), _identity),
    "4d": ((2, 3, 4, D), _identity),
    "transposed-leading": ((7, 5, D), lambda x: x.transpose(0, 1)),
    "transposed-last": ((D, 9), lambda x: x.T),
    "permuted-4d": ((2, 3, 4, D), lambda x: x.permute(2, 0, 1, 3)),
    "sliced-rows": ((12, D), lambda x: x[::3]),
    "sliced-cols": ((6, D + 5), lambda x: x[:, 2 : 2 + D]),
    "broadcast-rows": ((1, D), lambda x: x.expand(8, D)),
    "broadcast-3d": ((5, 1, D), lambda x: x.expand(5, 4, D)),
    "broadcast-1d": ((D,), lambda x: x.expand(3, 2, D)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_layouts(device, op, dtype, layout, make_inputs):
    """Non-contiguous, sliced, broadcast (stride-0) and multi-dim h: values and all gradients."""
    base_shape, view = LAYOUTS[layout]
    leaves = make_inputs(base_shape, 3, dtype, device=device, d=D)
    check_against_truth(op, leaves, view)


@pytest.mark.parametrize("op", OP_NAMES)
def test_non_contiguous_grad_out(device, op, make_inputs):
    """A transposed upstream gradient gives the same gradients as the float64 truth."""
    leaves = make_inputs((5, 6, D), 3, torch.float64, device=device)
    grad_out = torch.randn(D, 6, 5, dtype=torch.float64, device=device).permute(2, 1, 0)
    assert not grad_out.is_contiguous()
    check_against_truth(op, leaves, grad_out=grad_out)


@pytest.mark.parametrize(
    "N, d, r",
    [
        (1, 40, 4),
        (1, 1, 1),
        (37, 13, 1),
        (9, 1001, 3),
        (33, 64, 64),
        (5, 1001, 64),
        (130, 17, 2),
        (11, 1037, 33),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_shapes(device, op, dtype, N, d, r, make_inputs):
    """r = 1 and 64, d not a multiple of 16 (13, 17, 1001), N = 1: values and all gradients.
    (11, 1037, 33): the CPU kernels' column chunks (512) with a short last one and an odd strip
    count, rank groups (16) with a single last rank, row blocks (4, 8) with tail rows."""
    leaves = make_inputs((N, d), r, dtype, device=device)
    check_against_truth(op, leaves)


@pytest.mark.parametrize("shape", [(0, 13), (2, 0, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_empty_rows(device, op, dtype, shape, make_inputs):
    """N = 0: empty output of h's shape and dtype; parameter gradients are exact zeros."""
    leaves = make_inputs(shape, 3, dtype, torch.float32, device)
    out = OPS[op][0](*leaves)
    assert out.shape == shape and out.dtype == dtype
    out.sum().backward()
    h = leaves[0]
    assert h.grad.shape == shape and h.grad.dtype == dtype
    for p in leaves[1:]:
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize(
    ("N", "dtype"), [(5, torch.float32), (0, torch.float16), (3, torch.float64)]
)
def test_raw_ops_zero_width_rows(device, N, dtype):
    """d = 0 (it crashed the CPU backward with an integer division by zero): z = b, grad_h empty,
    every parameter gradient an exact zero."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h = torch.empty(N, 0, dtype=dtype, device=device)
    P = Q = torch.empty(2, 0, dtype=acc, device=device)
    b = torch.randn(2, dtype=acc, device=device)
    out, z = torch.ops.reft_ext.lowrank_edit_forward(h, P, Q, b)
    assert out.shape == (N, 0) and torch.equal(z, b.expand(N, 2))
    grad_h, grad_P, grad_Q, grad_b = torch.ops.reft_ext.lowrank_edit_backward(
        h, h, P, Q, z, ALL_GRADS
    )
    assert grad_h.shape == (N, 0) and grad_P.shape == grad_Q.shape == (2, 0)
    assert torch.equal(grad_b, torch.zeros(2, dtype=acc, device=device))


# --------------------------------------------------------------------------------------------------
# Determinism and robustness


def _run_all(op, leaves, grad_out):
    out = OPS[op][0](*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"]
)
@pytest.mark.parametrize("op", OP_NAMES)
def test_deterministic_across_runs_and_threads(op, dtype, make_inputs):
    """Bitwise identical out and grads on repeat runs and with 1 vs 2 threads (CPU).

    N = 1002 rows with r = 4 give 8 groups for the parameter reduction (one partial); with d = 64
    two threads split the forward rows at 501, not a multiple of the 4-row block.
    """
    leaves = make_inputs((1002, 64), 4, dtype, torch.float32)
    grad_out = torch.randn(1002, 64, dtype=torch.float64).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _run_all(op, leaves, grad_out)
        second = _run_all(op, leaves, grad_out)
        torch.set_num_threads(1)
        single = _run_all(op, leaves, grad_out)
    finally:
        torch.set_num_threads(threads)
    names = ["out", "grad_h", "grad_A", "grad_B", "grad_b"]
    for name, a, b, c in zip(names, first, second, single, strict=True):
        assert torch.equal(a, b), f"{name} differs between two runs"
        assert torch.equal(a, c), f"{name} differs between 2 threads and 1 thread"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_rows_independent_of_position(device, op, dtype, make_inputs):
    """A row's out and grad_h are bitwise the same wherever it sits in the batch.

    This is what makes any split of the rows (threads, blocks, GPU tiles) give identical results.
    """
    leaves = make_inputs((203, 40), 4, dtype, torch.float32, device)
    grad_out = torch.randn(203, 40, dtype=torch.float64).to(leaves[0])
    fused = OPS[op][0]
    out = fused(*leaves)
    (grad_h,) = torch.autograd.grad(out, leaves[0], grad_out)
    for start in (1, 2, 3, 5):
        h = leaves[0].detach()[start:].requires_grad_()
        out_s = fused(h, *leaves[1:])
        (grad_h_s,) = torch.autograd.grad(out_s, h, grad_out[start:])
        assert torch.equal(out_s, out[start:]), f"out differs with rows shifted by {start}"
        assert torch.equal(grad_h_s, grad_h[start:]), f"grad_h differs, shift {start}"


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("op", OP_NAMES)
def test_finite_on_large_inputs(device, op, dtype, make_inputs):
    """Finite out and gradients for finite random input of a realistic size."""
    leaves = make_inputs((4, 256, 768), 8, dtype, torch.float32, device)
    out = OPS[op][0](*leaves)
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all()


def test_saves_no_row_sized_intermediate(device, make_inputs):
    """loreft saves h itself and nothing else of N·d elements or more for backward."""
    N, d = 512, 64
    h, R, W, b = make_inputs((N, d), 2, torch.float32, device=device)
    saved = []

    def pack(t):
        saved.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _identity):
        out = reft_ext.loreft(h, R, W, b)
    assert saved, "no tensor was saved for backward"
    big = [numel for numel, ptr in saved if numel >= N * d and ptr != h.data_ptr()]
    assert not big, f"row-sized tensors saved besides h: {big}"
    torch.autograd.grad(out, (h, R, W, b), torch.ones_like(out))


# --------------------------------------------------------------------------------------------------
# Bad inputs, public API

DB, RB = 8, 3  # d and r of the bad-input cases


def _good():
    return {
        "h": torch.randn(4, DB),
        "A": torch.randn(RB, DB),
        "B": torch.randn(RB, DB),
        "b": torch.randn(RB),
    }


# case id -> (replacements of the good inputs, expected exception, argument it must name)
BAD_INPUTS = {
    "h-0d": ({"h": torch.tensor(1.0)}, ValueError, "h"),
    "h-int": ({"h": torch.ones(4, DB, dtype=torch.int64)}, ValueError, "h"),
    "h-complex": ({"h": torch.ones(4, DB, dtype=torch.complex64)}, ValueError, "h"),
    "h-list": ({"h": [[0.0] * DB] * 4}, TypeError, "h"),
    "A-1d": ({"A": torch.randn(DB)}, ValueError, "A"),
    "A-3d": ({"A": torch.randn(1, RB, DB)}, ValueError, "A"),
    "A-rank-0": (
        {"A": torch.randn(0, DB), "B": torch.randn(0, DB), "b": torch.randn(0)},
        ValueError,
        "A",
    ),
    "A-d-mismatch": ({"A": torch.randn(RB, DB + 1)}, ValueError, "A"),
    "B-d-mismatch": ({"B": torch.randn(RB, DB - 1)}, ValueError, "B"),
    "B-r-mismatch": ({"B": torch.randn(RB + 1, DB)}, ValueError, "B"),
    "b-too-long": ({"b": torch.randn(RB + 1)}, ValueError, "b"),
    "b-2d": ({"b": torch.randn(1, RB)}, ValueError, "b"),
    "b-0d": ({"b": torch.tensor(0.5)}, ValueError, "b"),
    "b-float": ({"b": 0.5}, TypeError, "b"),
    "A-none": ({"A": None}, TypeError, "A"),
    "A-int": ({"A": torch.ones(RB, DB, dtype=torch.int32)}, ValueError, "A"),
    "b-int": ({"b": torch.ones(RB, dtype=torch.int64)}, ValueError, "b"),
    "A-fp64-with-fp32-h": ({"A": torch.randn(RB, DB, dtype=torch.float64)}, ValueError, "A"),
    "B-fp64-with-fp32-h": ({"B": torch.randn(RB, DB, dtype=torch.float64)}, ValueError, "B"),
    "b-fp64-with-fp32-h": ({"b": torch.randn(RB, dtype=torch.float64)}, ValueError, "b"),
    "h-sparse": ({"h": torch.randn(4, DB).to_sparse()}, ValueError, "h"),
    "A-sparse": ({"A": torch.randn(RB, DB).to_sparse()}, ValueError, "A"),
    "A-meta": ({"A": torch.randn(RB, DB, device="meta")}, ValueError, "A"),
    "A-bf16-with-fp16-h": (
        {"h": torch.randn(4, DB).half(), "A": torch.randn(RB, DB).bfloat16()},
        ValueError,
        "A",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("op", OP_NAMES)
def test_bad_inputs_name_the_argument(op, case):
    """Bad input raises TypeError/ValueError whose message names the offending argument."""
    replace, exc, which = BAD_INPUTS[case]
    args = {**_good(), **replace}
    names = dict(zip(("A", "B"), OPS[op][3], strict=True))
    name = names.get(which, which)
    with pytest.raises(exc, match=rf"\b{name} must\b"):
        OPS[op][0](args["h"], args["A"], args["B"], args["b"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("which", ["A", "B", "b"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_bad_inputs_mixed_devices(op, which):
    """A parameter on another device than h raises ValueError naming it."""
    args = _good()
    args[which] = args[which].cuda()
    name = dict(zip(("A", "B"), OPS[op][3], strict=True)).get(which, which)
    with pytest.raises(ValueError, match=rf"\b{name} must\b"):
        OPS[op][0](args["h"], args["A"], args["B"], args["b"])


# --------------------------------------------------------------------------------------------------
# Bad inputs, raw ops


def _raw_good():
    h, P, Q, b = _raw_inputs(torch.float32, torch.float32, "cpu", N=4, d=DB, r=RB)
    return {"h": h, "P": P, "Q": Q, "b": b}


RAW_FORWARD_BAD = {
    "h-non-contiguous": ({"h": torch.randn(DB, 4).T}, "h"),
    "h-1d": ({"h": torch.randn(DB)}, "h"),
    "h-int": ({"h": torch.ones(4, DB, dtype=torch.int32)}, "h"),
    "P-fp64-for-fp32-h": ({"P": torch.randn(RB, DB, dtype=torch.float64)}, "P"),
    "P-bf16-for-bf16-h": (
        {"h": torch.randn(4, DB).bfloat16(), "P": torch.randn(RB, DB).bfloat16()},
        "P",
    ),
    "P-1d": ({"P": torch.randn(DB)}, "P"),
    "P-d-mismatch": ({"P": torch.randn(RB, DB + 1)}, "P"),
    "P-non-contiguous": ({"P": torch.randn(DB, RB).T}, "P"),
    "Q-shape": ({"Q": torch.randn(RB + 1, DB)}, "Q"),
    "Q-fp16": ({"Q": torch.randn(RB, DB).half()}, "Q"),
    "b-shape": ({"b": torch.randn(RB + 2)}, "b"),
}


@pytest.mark.parametrize("case", list(RAW_FORWARD_BAD))
def test_raw_forward_bad_inputs(case):
    """Direct lowrank_edit_forward calls with bad arguments raise RuntimeError naming them."""
    replace, name = RAW_FORWARD_BAD[case]
    args = {**_raw_good(), **replace}
    with pytest.raises(RuntimeError, match=rf"\b{name} must\b"):
        torch.ops.reft_ext.lowrank_edit_forward(args["h"], args["P"], args["Q"], args["b"])


RAW_BACKWARD_BAD = {
    "grad_out-dtype": ({"grad_out": torch.randn(4, DB, dtype=torch.float64)}, "grad_out"),
    "grad_out-shape": ({"grad_out": torch.randn(5, DB)}, "grad_out"),
    "grad_out-non-contiguous": ({"grad_out": torch.randn(DB, 4).T}, "grad_out"),
    "z-shape": ({"z": torch.randn(4, RB + 1)}, "z"),
    "z-dtype": ({"z": torch.randn(4, RB, dtype=torch.float64)}, "z"),
    "h-non-contiguous": ({"h": torch.randn(DB, 4).T}, "h"),
    "P-fp64": ({"P": torch.randn(RB, DB, dtype=torch.float64)}, "P"),
}


@pytest.mark.parametrize("case", list(RAW_BACKWARD_BAD))
def test_raw_backward_bad_inputs(case):
    """Direct lowrank_edit_backward calls with bad arguments raise RuntimeError naming them."""
    replace, name = RAW_BACKWARD_BAD[case]
    good = _raw_good()
    _, z = torch.ops.reft_ext.lowrank_edit_forward(good["h"], good["P"], good["Q"], good["b"])
    args = {**good, "z": z, "grad_out": torch.randn(4, DB), **replace}
    with pytest.raises(RuntimeError, match=rf"\b{name} must\b"):
        torch.ops.reft_ext.lowrank_edit_backward(
            args["grad_out"], args["h"], args["P"], args["Q"], args["z"], ALL_GRADS
        )


@pytest.mark.parametrize("meta", ["P", "Q", "b"])
def test_raw_forward_refuses_a_meta_tensor_beside_cpu_ones(meta):
    """A meta tensor among CPU ones dispatches to the fake kernel; it used to return
    uninitialized memory as the result."""
    args = _raw_good()
    args[meta] = args[meta].to("meta")
    with pytest.raises(ValueError, match=rf"{meta} must be on h's device \(cpu\), got meta"):
        torch.ops.reft_ext.lowrank_edit_forward(args["h"], args["P"], args["Q"], args["b"])


@pytest.mark.parametrize("meta", ["grad_out", "z", "P"])
def test_raw_backward_refuses_a_meta_tensor_beside_cpu_ones(meta):
    good = _raw_good()
    _, z = torch.ops.reft_ext.lowrank_edit_forward(good["h"], good["P"], good["Q"], good["b"])
    args = {**good, "z": z, "grad_out": torch.randn(4, DB)}
    args[meta] = args[meta].to("meta")
    with pytest.raises(ValueError, match=rf"{meta} must be on h's device \(cpu\), got meta"):
        torch.ops.reft_ext.lowrank_edit_backward(
            args["grad_out"], args["h"], args["P"], args["Q"], args["z"], ALL_GRADS
        )


@pytest.mark.parametrize("shape", [(3, 0), (2, 5, 0), (0, 0)])
@pytest.mark.parametrize("op", OP_NAMES)
def test_empty_feature_dimension_is_the_identity(device, op, shape):
    """d = 0: nothing to edit; the output is h (empty) and the gradients are the float64 truth's
    (b's is zero: the back-projection has no columns)."""
    fn, truth = OPS[op][0], OPS[op][1]
    h = torch.randn(shape, device=device, requires_grad=True)
    A, B = (torch.randn(2, 0, device=device, requires_grad=True) for _ in range(2))
    b = torch.randn(2, device=device, requires_grad=True)
    out = fn(h, A, B, b)
    assert out.shape == shape
    grads = torch.autograd.grad(out.sum(), (h, A, B, b))
    leaves = [t.detach().double().requires_grad_() for t in (h, A, B, b)]
    wanted = torch.autograd.grad(
        truth(*leaves).sum(), leaves, allow_unused=True, materialize_grads=True
    )
    for got, want in zip(grads, wanted, strict=True):
        assert got.shape == want.shape and torch.equal(got.double(), want)


def test_hessian_raises_instead_of_silent_zeros():
    """torch.autograd.functional.hessian (incoming gradients that do not require grad) used to
    return an all-zero Hessian; grad of grad with materialize_grads returned zeros."""
    P, Q = (torch.randn(2, 5, dtype=torch.float64) for _ in range(2))
    b = torch.randn(2, dtype=torch.float64)
    h = torch.randn(3, 5, dtype=torch.float64)

    def f(h):
        return reft_ext.lowrank_edit(h, P, Q, b).square().sum()

    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.functional.hessian(f, h)
    x = h.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(g.sum(), x, materialize_grads=True)


def test_create_graph_first_order_gradients_are_right():
    """create_graph=True for another reason (e.g. a penalty elsewhere) still gives the right
    first-order gradients."""
    leaves = [t.double().requires_grad_() for t in (torch.randn(4, 6), *torch.randn(2, 2, 6))]
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(
        reft_ext.lowrank_edit(*leaves, b).square().sum(), [*leaves, b], create_graph=True
    )
    leaves64 = [t.detach().requires_grad_() for t in (*leaves, b)]
    truths = torch.autograd.grad(truth_lowrank_edit(*leaves64).square().sum(), leaves64)
    for g, t in zip(grads, truths, strict=True):
        assert_close_rel(g.detach(), t)


def test_double_backward_raises_instead_of_silently_wrong():
    """Second derivatives are not implemented: differentiating through backward must raise."""
    h = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    R, W = (torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(reft_ext.loreft(h, R, W, b).square().sum(), h, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.square().sum(), (h, R, W, b))
