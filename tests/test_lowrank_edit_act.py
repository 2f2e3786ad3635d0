"""Tests of the activated edit ``lowrank_edit_act`` (pyreft's act_fn on the fused kernels):
h + (act(h Wᵀ + b) − (h Sᵀ + c)) Q against a float64 truth written with torch's own activations
(tests/truth.py), on the CPU kernels, the emulated CUDA kernels and a GPU where present.
"""

import pytest
import torch
from truth import TRUTH_ACTIVATIONS, assert_close_rel, max_abs_err, truth_lowrank_edit_act

import reft_ext
from reft_ext.ops import ACTIVATIONS

NAMES = ("h", "W", "b", "Q", "S", "c")


def act_inputs(N, d, r, dtype, device, subtract=True, param_dtype=None, bias_S=True):
    """Leaves {h, W, b, Q[, S[, c]]} requiring grad: h (N, d), factors (r, d) / d**0.5, biases
    (r,)."""
    param_dtype = param_dtype or dtype
    scale = d**-0.5
    leaves = {
        "h": torch.randn(N, d, dtype=torch.float64).to(device, dtype),
        "W": (torch.randn(r, d, dtype=torch.float64) * scale).to(device, param_dtype),
        "b": torch.randn(r, dtype=torch.float64).to(device, param_dtype),
        "Q": (torch.randn(r, d, dtype=torch.float64) * scale).to(device, param_dtype),
    }
    if subtract:
        leaves["S"] = (torch.randn(r, d, dtype=torch.float64) * scale).to(device, param_dtype)
        if bias_S:
            leaves["c"] = torch.randn(r, dtype=torch.float64).to(device, param_dtype)
    return {k: t.requires_grad_() for k, t in leaves.items()}


def fused_and_truth(leaves, activation, grad_out):
    """(out, grads) of the fused op and (out64, grads64) of the truth, for ⟨grad_out, out⟩."""
    out = reft_ext.lowrank_edit_act(activation=activation, **leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out))
    leaves64 = {k: t.detach().double().requires_grad_() for k, t in leaves.items()}
    out64 = truth_lowrank_edit_act(activation=activation, **leaves64)
    grads64 = torch.autograd.grad(out64, list(leaves64.values()), grad_out.double())
    return (out, grads), (out64.detach(), grads64)


@pytest.mark.parametrize("subtract", [True, False], ids=["minus-S", "no-S"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "dtype, param_dtype",
    [(torch.float64, None), (torch.float32, None), (torch.float64, torch.float32)],
    ids=["fp64", "fp32", "fp64-h-fp32-params"],
)
@pytest.mark.parametrize(
    "N, d, r", [(1, 8, 1), (13, 37, 3), (130, 67, 9)], ids=["one-row", "tails", "many-rows"]
)
def test_matches_truth(device, N, d, r, dtype, param_dtype, activation, subtract):
    """Output and every gradient (h, W, b, Q, S, c) match the float64 truth: to 1e-10 in
    float64; in float32 to 1e-4 of the largest magnitude, or within twice the error of torch's
    own float32 composite where that is larger (act' by its formula cancels where it is near 0,
    e.g. GELU's near x = −0.75, in torch's backward as in ours)."""
    leaves = act_inputs(N, d, r, dtype, device, subtract, param_dtype)
    grad_out = torch.randn(N, d, dtype=torch.float64)
    (out, grads), (out64, grads64) = fused_and_truth(leaves, activation, grad_out)
    assert out.dtype == dtype and out.shape == leaves["h"].shape
    if dtype == torch.float64 and param_dtype is None:
        assert_close_rel(out, out64)
        for leaf, g, g64 in zip(leaves.values(), grads, grads64, strict=True):
            assert g.dtype == leaf.dtype and g.shape == leaf.shape
            assert_close_rel(g, g64)
        return
    low = {k: t.detach().float().requires_grad_() for k, t in leaves.items()}
    naive = truth_lowrank_edit_act(activation=activation, **low)
    naive_grads = torch.autograd.grad(naive, list(low.values()), grad_out.float())
    triples = zip((out, *grads), (out64, *grads64), (naive, *naive_grads), strict=True)
    for got, want, torch_own in triples:
        scale = want.abs().max().item()
        assert max_abs_err(got, want) <= max(2 * max_abs_err(torch_own, want), 1e-4 * scale)


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_at_most_twice_the_composites(device, dtype, activation):
    """bf16/fp16 rows: the error (vs float64) of out and ∂h is at most twice that of the same
    formula computed by torch in the rows' dtype (parameters in it too)."""
    leaves = act_inputs(64, 96, 4, dtype, device, param_dtype=torch.float32)
    low = {k: t.detach().to(dtype).requires_grad_() for k, t in leaves.items()}
    naive = truth_lowrank_edit_act(activation=activation, **low)
    grad_out = torch.randn(naive.shape).to(naive)
    (out, grads), (out64, grads64) = fused_and_truth(leaves, activation, grad_out)
    (naive_grad_h,) = torch.autograd.grad(naive, low["h"], grad_out)
    slack = 1e-6
    assert max_abs_err(out, out64) <= 2 * max_abs_err(naive, out64) + slack
    assert max_abs_err(grads[0], grads64[0]) <= 2 * max_abs_err(naive_grad_h, grads64[0]) + slack
    for g, g64 in zip(grads[1:], grads64[1:], strict=True):  # float32 parameters, fp32 sums
        assert_close_rel(g, g64, rel=1e-4)


@pytest.mark.parametrize("wanted", ["h", "W", "Q", "S", "b"])
def test_one_gradient_at_a_time(device, wanted):
    """Only one input requiring grad: the kernels skip the other passes, and that gradient still
    matches the truth (∂Q alone needs no ∂v; ∂W, ∂S, ∂b need ∂v without ∂h)."""
    leaves = act_inputs(40, 48, 3, torch.float64, device)
    for name, t in leaves.items():
        t.requires_grad_(name == wanted)
    out = reft_ext.lowrank_edit_act(activation="gelu", **leaves)
    grad_out = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, leaves[wanted], grad_out)
    leaves64 = {k: t.detach().requires_grad_(k == wanted) for k, t in leaves.items()}
    out64 = truth_lowrank_edit_act(activation="gelu", **leaves64)
    (g64,) = torch.autograd.grad(out64, leaves64[wanted], grad_out)
    assert_close_rel(g, g64)


def test_identity_with_S_is_the_plain_edit(device):
    """act = identity and S: the plain edit with P = W − S, b − c (to rounding)."""
    leaves = act_inputs(33, 40, 4, torch.float64, device)
    out = reft_ext.lowrank_edit_act(activation="identity", **leaves)
    h, W, b, Q, S, c = (leaves[k] for k in NAMES)
    plain = reft_ext.lowrank_edit(h, W - S, Q, b - c)
    assert_close_rel(out, plain.detach())


def test_threads_do_not_change_the_bits():
    """CPU: the parameter sums use the shape's fixed row groups, not the thread count."""
    leaves = act_inputs(700, 64, 3, torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = reft_ext.lowrank_edit_act(activation="silu", **leaves)
            results.append([out, *torch.autograd.grad(out.sum(), list(leaves.values()))])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rp_twice", [True, False], ids=["rp=2r", "rp=r"])
def test_opcheck(device, rp_twice):
    """The raw ops' schemas, fakes and autograd registration (torch.library.opcheck)."""
    r, d = 3, 20
    h = torch.randn(5, d, device=device, requires_grad=True)
    P = torch.randn(2 * r if rp_twice else r, d, device=device, requires_grad=True)
    Q = torch.randn(r, d, device=device, requires_grad=True)
    b = torch.randn(P.shape[0], device=device, requires_grad=True)
    forward = torch.ops.reft_ext.lowrank_edit_act_forward
    torch.library.opcheck(forward, (h, P, Q, b, "gelu_tanh"))
    out, v, z = forward(h, P, Q, b, "gelu_tanh")
    args = (torch.randn_like(out), h.detach(), P.detach(), Q.detach(), v, z, "gelu_tanh")
    torch.library.opcheck(torch.ops.reft_ext.lowrank_edit_act_backward, (*args, [True] * 4))
    torch.library.opcheck(
        torch.ops.reft_ext.lowrank_edit_act_backward, (*args, [False, True, False, True])
    )


def test_compile_fullgraph_matches_eager(device):
    leaves = act_inputs(17, 24, 2, torch.float32, device)

    def step(**tensors):
        return reft_ext.lowrank_edit_act(activation="relu", **tensors).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    eager_loss = step(**leaves)
    eager = torch.autograd.grad(eager_loss, list(leaves.values()))
    loss = compiled(**leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager, strict=True):
        torch.testing.assert_close(g, e)


def test_argument_errors_name_the_argument():
    leaves = {k: t.detach() for k, t in act_inputs(4, 8, 2, torch.float32, "cpu").items()}
    h, W, b, Q, S, c = (leaves[k] for k in NAMES)
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'swish'"):
        reft_ext.lowrank_edit_act(h, W, b, Q, "swish")
    with pytest.raises(ValueError, match="c .* needs S"):
        reft_ext.lowrank_edit_act(h, W, b, Q, "relu", c=c)
    with pytest.raises(ValueError, match=r"c must have b's shape \(2,\), got \(3,\)"):
        reft_ext.lowrank_edit_act(h, W, b, Q, "relu", S, torch.zeros(3))
    with pytest.raises(ValueError, match=r"S must have shape"):
        reft_ext.lowrank_edit_act(h, W, b, Q, "relu", S[:, :4])
    with pytest.raises(TypeError, match="Q must be a torch.Tensor"):
        reft_ext.lowrank_edit_act(h, W, b, Q.tolist(), "relu")
    forward = torch.ops.reft_ext.lowrank_edit_act_forward
    with pytest.raises(ValueError, match="activation must be one of identity, relu, .*got 'x'"):
        forward(h, torch.cat([W, S]), Q, torch.cat([b, c]), "x")
    with pytest.raises(RuntimeError, match=r"P must be 2-D \(rp, d\) with rp = r or 2r"):
        forward(h, torch.cat([W, S, W]), Q, torch.cat([b, c, b]), "relu")


def test_activation_lists_agree():
    """ACTIVATIONS (Python) and the kernels' table name the same activations, and the truth
    covers each of them."""
    assert set(ACTIVATIONS) == set(TRUTH_ACTIVATIONS)
    h, W, Q, b = torch.randn(2, 4), torch.randn(1, 4), torch.randn(1, 4), torch.randn(1)
    for name in ACTIVATIONS:
        torch.ops.reft_ext.lowrank_edit_act_forward(h, W, Q, b, name)
