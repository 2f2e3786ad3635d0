"""Tests of the multi-adapter edit ``lowrank_edit_multi`` against a float64 per-row truth.

The truth (tests/truth.py's truth_lowrank_edit_multi) edits each row alone with its own adapter's
factors, so it shares nothing with the kernels' grouping of rows by adapter; its gradients come
from autograd of that loop.
"""

import pytest
import torch
from truth import assert_close_rel, max_abs_err, truth_lowrank_edit, truth_multi_and_grads

import reft_ext
from reft_ext import reference


def multi_inputs(N, d, A, r, dtype, device, param_dtype=None, indices=None):
    """Random (h (N, d), P, Q (A, r, d), b (A, r)) requiring grad, and an adapter index (N,)."""
    param_dtype = param_dtype or dtype
    scale = d**-0.5
    h = torch.randn(N, d, dtype=torch.float64).to(device, dtype)
    P = (torch.randn(A, r, d, dtype=torch.float64) * scale).to(device, param_dtype)
    Q = (torch.randn(A, r, d, dtype=torch.float64) * scale).to(device, param_dtype)
    b = torch.randn(A, r, dtype=torch.float64).to(device, param_dtype)
    if indices is None:
        indices = torch.randint(-1, A, (N,))
    leaves = [t.requires_grad_() for t in (h, P, Q, b)]
    return leaves, indices.to(device)


def fused_and_truth(leaves, adapter, grad_out=None):
    """((out, grads), (out64, grads64), grad_out) of the fused op and of the float64 truth."""
    out = reft_ext.lowrank_edit_multi(*leaves, adapter)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return (out, grads), truth_multi_and_grads(leaves, adapter, grad_out), grad_out


def check_against_truth(leaves, adapter):
    (out, grads), (out64, grads64), _ = fused_and_truth(leaves, adapter)
    assert out.dtype == leaves[0].dtype and out.shape == leaves[0].shape
    assert_close_rel(out, out64)
    for leaf, g, g64 in zip(leaves, grads, grads64, strict=True):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert_close_rel(g, g64)


@pytest.mark.parametrize(
    "dtype, param_dtype",
    [(torch.float64, None), (torch.float32, None), (torch.float64, torch.float32)],
    ids=["fp64", "fp32", "fp64-h-fp32-params"],
)
@pytest.mark.parametrize(
    "N, d, A, r",
    [(1, 8, 1, 1), (37, 96, 5, 3), (130, 67, 3, 9), (64, 40, 256, 2), (300, 32, 7, 8)],
    ids=["one-row", "mixed", "tails", "A256", "many-rows"],
)
def test_matches_per_row_truth(device, dtype, param_dtype, N, d, A, r):
    """Values and all four gradients (each adapter's summed over its rows) match the truth."""
    leaves, adapter = multi_inputs(N, d, A, r, dtype, device, param_dtype)
    check_against_truth(leaves, adapter)


def test_absent_adapters_get_zero_gradients(device):
    """Adapters no row uses get exact zero gradients; the others match the truth."""
    indices = torch.tensor([4, 0, 4, -1, 0, 4, 4, 0, -1, 4])
    leaves, adapter = multi_inputs(10, 24, 6, 3, torch.float64, device, indices=indices)
    check_against_truth(leaves, adapter)
    out = reft_ext.lowrank_edit_multi(*leaves, adapter)
    grads = torch.autograd.grad(out.sum(), leaves)
    for absent in (1, 2, 3, 5):
        for g in grads[1:]:
            assert torch.count_nonzero(g[absent]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_all_rows_unedited_copies_exactly(device, dtype):
    """adapter = -1 everywhere: out is h and ∂h is the incoming gradient, bit for bit; the
    parameters get zero gradients."""
    leaves, adapter = multi_inputs(21, 40, 3, 4, dtype, device, indices=torch.full((21,), -1))
    out = reft_ext.lowrank_edit_multi(*leaves, adapter)
    assert torch.equal(out, leaves[0])
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    assert torch.equal(grads[0], g)
    for grad in grads[1:]:
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"]
)
@pytest.mark.parametrize("N", [7, 515], ids=["N7", "N515"])
def test_one_adapter_equals_single_op_bit_for_bit(device, dtype, N):
    """Every row on adapter 2 of 4 gives exactly lowrank_edit with adapter 2's factors: output and
    every gradient (the same grouping of rows for the parameter sums)."""
    leaves, adapter = multi_inputs(N, 72, 4, 5, dtype, device, indices=torch.full((N,), 2))
    out = reft_ext.lowrank_edit_multi(*leaves, adapter)
    h, P, Q, b = leaves
    single = [t.detach().clone().requires_grad_() for t in (h, P[2], Q[2], b[2])]
    out_single = reft_ext.lowrank_edit(*single)
    assert torch.equal(out, out_single)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    grads_single = torch.autograd.grad(out_single, single, g)
    assert torch.equal(grads[0], grads_single[0])
    for multi_grad, single_grad in zip(grads[1:], grads_single[1:], strict=True):
        assert torch.equal(multi_grad[2], single_grad)
        assert torch.count_nonzero(multi_grad[[0, 1, 3]]) == 0


def test_int32_and_int64_indices_agree(device):
    leaves, adapter = multi_inputs(50, 33, 4, 3, torch.float32, device)
    g = torch.randn(50, 33, device=device)
    results = []
    for index_dtype in (torch.int64, torch.int32):
        out = reft_ext.lowrank_edit_multi(*leaves, adapter.to(index_dtype))
        results.append((out, torch.autograd.grad(out, leaves, g)))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)


def test_deterministic(device):
    """Two runs give the same bits (no atomics; fixed grouping and order)."""
    leaves, adapter = multi_inputs(700, 48, 9, 4, torch.float32, device)
    g = torch.randn(700, 48, device=device)
    runs = []
    for _ in range(2):
        out = reft_ext.lowrank_edit_multi(*leaves, adapter)
        runs.append((out, *torch.autograd.grad(out, leaves, g)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_thread_count_does_not_change_bits():
    leaves, adapter = multi_inputs(2000, 64, 5, 4, torch.float32, "cpu")
    g = torch.randn(2000, 64)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = reft_ext.lowrank_edit_multi(*leaves, adapter)
            runs.append((out, *torch.autograd.grad(out, leaves, g)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_leading_dimensions(device):
    """h (B, T, d) with adapter (B, T): the same as the flattened rows."""
    leaves, adapter = multi_inputs(24, 16, 3, 2, torch.float64, device)
    h3 = leaves[0].detach().view(4, 6, 16)
    out = reft_ext.lowrank_edit_multi(h3, *leaves[1:], adapter.view(4, 6))
    assert out.shape == (4, 6, 16)
    assert torch.equal(out.view(24, 16), reft_ext.lowrank_edit_multi(*leaves, adapter))


def test_lower_rank_adapter_padded_with_zero_rows(device):
    """An adapter of rank 2 stored in a rank-5 stack (zero rows 2..4) edits as its rank-2 self."""
    leaves, adapter = multi_inputs(30, 20, 2, 5, torch.float64, device, indices=torch.ones(30))
    h, P, Q, b = (t.detach() for t in leaves)
    P, Q, b = P.clone(), Q.clone(), b.clone()
    P[1, 2:], Q[1, 2:], b[1, 2:] = 0, 0, 0
    out = reft_ext.lowrank_edit_multi(h, P, Q, b, adapter.long())
    assert_close_rel(out, truth_lowrank_edit(h, P[1, :2], Q[1, :2], b[1, :2]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_composite(device, dtype):
    """bf16/fp16 rows: error (vs float64) of out and ∂h at most 2× the gather-einsum composite's."""
    leaves, adapter = multi_inputs(200, 100, 6, 8, dtype, device, torch.float32)
    (out, grads), (out64, grads64), grad_out = fused_and_truth(leaves, adapter)
    naive = reference.lowrank_edit_multi(*leaves, adapter)
    (naive_grad_h,) = torch.autograd.grad(naive, leaves[0], grad_out)
    slack = 1e-6
    assert max_abs_err(out, out64) <= 2 * max_abs_err(naive, out64) + slack
    assert max_abs_err(grads[0], grads64[0]) <= 2 * max_abs_err(naive_grad_h, grads64[0]) + slack
    for g, g64 in zip(grads[1:], grads64[1:], strict=True):
        assert_close_rel(g, g64, rel=1e-2)  # fp32 parameter sums of rounded rows


@pytest.mark.parametrize("bad", [-2, 3, 1000])
def test_index_outside_range_raises(device, bad):
    leaves, adapter = multi_inputs(9, 8, 3, 2, torch.float32, device)
    adapter[5] = bad
    with pytest.raises(RuntimeError, match="adapter"):
        reft_ext.lowrank_edit_multi(*leaves, adapter)


# --------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, argument errors


def _raw_multi(device, dtype=torch.float32, acc=torch.float32, N=11, d=24, A=3, r=3):
    h = torch.randn(N, d, device=device, dtype=torch.float64).to(dtype)
    P, Q = (torch.randn(A, r, d, device=device, dtype=acc) for _ in range(2))
    b = torch.randn(A, r, device=device, dtype=acc)
    adapter = torch.randint(-1, A, (N,), device=device)
    return h, P, Q, b, adapter


@pytest.mark.parametrize(
    "dtype, acc",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
    ],
    ids=["fp32", "fp64", "bf16"],
)
def test_opcheck(device, dtype, acc):
    h, P, Q, b, adapter = _raw_multi(device, dtype, acc)
    forward = torch.ops.reft_ext.lowrank_edit_multi_forward.default
    torch.library.opcheck(forward, (h, P, Q, b, adapter))
    _, z = torch.ops.reft_ext.lowrank_edit_multi_forward(h, P, Q, b, adapter)
    torch.library.opcheck(
        torch.ops.reft_ext.lowrank_edit_multi_backward.default,
        (torch.randn_like(h), h, P, Q, z, adapter, [True] * 4),
    )
    leaves = [t.requires_grad_() for t in (P, Q, b)]
    torch.library.opcheck(
        torch.ops.reft_ext.lowrank_edit_multi_forward.default, (h, *leaves, adapter)
    )


def test_compile_fullgraph_matches_eager(device):
    def step(h, P, Q, b, adapter):
        out = reft_ext.lowrank_edit_multi(torch.tanh(h), P, Q, b, adapter)
        return (out * out).sum(-1).sqrt().mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    leaves, adapter = multi_inputs(40, 32, 4, 3, torch.float32, device)
    eager = step(*leaves, adapter)
    eager_grads = torch.autograd.grad(eager, leaves)
    loss = compiled(*leaves, adapter)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, ge in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-6)


def test_double_backward_raises():
    leaves, adapter = multi_inputs(5, 8, 2, 2, torch.float64, "cpu")
    out = reft_ext.lowrank_edit_multi(*leaves, adapter)
    (gh,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        gh.sum().backward()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "P": a["P"][0]}, "P must have shape \\(A, r, d\\)"),
        (lambda a: {**a, "Q": a["Q"][:, :1]}, "Q must have shape"),
        (lambda a: {**a, "b": a["b"][0]}, "b must have shape"),
        (lambda a: {**a, "adapter": a["adapter"].float()}, "adapter must be torch.int32"),
        (lambda a: {**a, "adapter": a["adapter"][:-1]}, "adapter must have h's leading shape"),
        (lambda a: {**a, "h": a["h"].int()}, "h must be"),
        (lambda a: {**a, "P": a["P"].half()}, "P must have h's dtype"),
        (lambda a: {**a, "adapter": a["adapter"].tolist()}, "adapter must be a torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_argument(change, match):
    h, P, Q, b, adapter = _raw_multi("cpu")
    args = change({"h": h, "P": P, "Q": Q, "b": b, "adapter": adapter})
    with pytest.raises((ValueError, TypeError), match=match):
        reft_ext.lowrank_edit_multi(**args)
