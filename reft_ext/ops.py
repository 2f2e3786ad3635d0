"""The compiled ops (``torch.ops.reft_ext.*``) with their fake kernels and autograd formula,
registered beside each op.

Raw ops (all tensors contiguous; acc = float64 for float64 rows, float32 otherwise):
    lowrank_edit_forward(h (N, d), P (r, d) acc, Q (r, d) acc, b (r,) acc)
        -> (out (N, d), z (N, r) acc)
        Differentiable in h, P, Q and b (z is not): its backward asks lowrank_edit_backward for
        the gradients autograd needs (``ctx.needs_input_grad``) and the kernels skip the others.
    lowrank_edit_backward(grad_out (N, d), h, P, Q, z, output_mask [4 bools: h, P, Q, b])
        -> (grad_h (N, d), grad_P (r, d), grad_Q (r, d), grad_b (r,)); a gradient not in the
        mask is an empty (0,) tensor.
    lowrank_edit_multi_forward(h (N, d), P (A, r, d) acc, Q (A, r, d) acc, b (A, r) acc,
                               adapter (N,) int64 or int32 in [-1, A))
        -> (out (N, d), z (N, r) acc): row i edited by adapter[i]'s factors, -1 copied (z = 0).
        Differentiable in h, P, Q and b through lowrank_edit_multi_backward(grad_out, h, P, Q, z,
        adapter, output_mask) -> (grad_h, grad_P (A, r, d), grad_Q, grad_b (A, r)).
    lowrank_edit_act_forward(h (N, d), P (rp, d) acc, Q (r, d) acc, b (rp,) acc, activation)
        -> (out (N, d), v (N, rp) acc, z (N, r) acc): v = h Pᵀ + b = [u | s] (rp = 2r) or u
        (rp = r), z = act(u) − s, out = h + z Q; activation one of ACTIVATIONS. Differentiable in
        h, P, Q and b through lowrank_edit_act_backward(grad_out, h, P, Q, v, z, activation,
        output_mask) -> (grad_h, grad_P (rp, d), grad_Q (r, d), grad_b (rp,)).
    retract_(R (r, d) or (k, r, d), method "cholqr2" | "qr" | "polar", check_finite=False)
        -> None, R in place. A matrix holding NaN or Inf is set to NaN, or with check_finite left
        as it was and reported: ValueError on CPU (after the batch), a device-side assert on CUDA
        (no host synchronization).
    retract_list_(Rs [tensors as R, one dtype and device], method, check_finite=False) -> None:
        retract_ on every tensor in one call (CPU: one parallel loop over all their matrices).
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (importing the library registers its ops with the dispatcher)


def cuda_available() -> bool:
    """True when this build of reft_ext contains the CUDA kernels (a GPU need not be present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("reft_ext::lowrank_edit_forward", "CUDA")


def cpu_kernels() -> str:
    """The build of the CPU kernels this process runs: ``"avx512"`` (AVX-512 F/BW/VL: 32 vector
    registers, wider register tiles), ``"avx2"`` (AVX2 + FMA) or ``"portable"`` (any CPU).

    The best one this CPU supports, chosen once per process; the environment variable
    ``REFT_EXT_CPU_KERNELS`` (``portable``, ``avx2`` or ``avx512``) caps it, e.g. to test the path
    a smaller CPU takes. The edit ops add the same terms in the same order in every variant:
    the AVX2 and AVX-512 builds give the same bits, the portable build, which has no FMA, rounds
    each product separately (the retraction is only held to the same accuracy).
    """
    return torch.ops.reft_ext.cpu_kernels()


# lowrank_edit_forward -----------------------------------------------------------------------------


def _check_same_device(op: str, rows: torch.Tensor, **tensors: torch.Tensor) -> None:
    """The device check of the C++ kernels, for the fakes: a meta tensor mixed with real ones
    dispatches here (Meta wins), and an unchecked fake would hand back uninitialized memory."""
    for name, t in tensors.items():
        if t.device != rows.device:
            raise ValueError(f"{op}: {name} must be on h's device ({rows.device}), got {t.device}")


@torch.library.register_fake("reft_ext::lowrank_edit_forward")
def _lowrank_edit_forward_fake(h, P, Q, b):
    _check_same_device("lowrank_edit_forward", h, P=P, Q=Q, b=b)
    return torch.empty_like(h), h.new_empty((h.shape[0], P.shape[0]), dtype=P.dtype)


def _lowrank_edit_setup_context(ctx, inputs, output):
    h, P, Q, _ = inputs
    _, z = output
    # Saves h, P, Q and z (N×r): no N×d intermediate.
    ctx.save_for_backward(h, P, Q, z)
    ctx.mark_non_differentiable(z)


def _lowrank_edit_backward(ctx, grad_out, _grad_z):
    h, P, Q, z = ctx.saved_tensors
    mask = list(ctx.needs_input_grad)
    with torch.no_grad():
        grads = torch.ops.reft_ext.lowrank_edit_backward(grad_out.contiguous(), h, P, Q, z, mask)
    grads = tuple(g if wanted else None for g, wanted in zip(grads, mask, strict=True))
    return _first_order(grads, h, P, Q, grad_out)


def _first_order(grads, *sources):
    """``grads`` as they are for the usual backward (create_graph=False). Under create_graph=True
    they depend on ``sources``: link them to those in the graph through a node that raises,
    instead of handing back constants (torch's once_differentiable raises only when the incoming
    gradient requires grad, so a Hessian came out as silent zeros)."""
    if not torch.is_grad_enabled():
        return grads
    wanted = [g for g in grads if g is not None]
    linked = iter(_FirstOrderOnly.apply(len(sources), *sources, *wanted))
    return tuple(None if g is None else next(linked) for g in grads)


torch.library.register_autograd(
    "reft_ext::lowrank_edit_forward",
    _lowrank_edit_backward,
    setup_context=_lowrank_edit_setup_context,
)


class _FirstOrderOnly(torch.autograd.Function):
    """``apply(n, *sources, *grads)`` returns ``grads`` unchanged, as a function of the ``n``
    tensors they were computed from; differentiating them raises (no second derivative)."""

    @staticmethod
    def forward(n_sources, *tensors):
        return tuple(g.clone() for g in tensors[n_sources:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "reft_ext's fused edit is first-order only: its gradients cannot be differentiated "
            "again (double backward, torch.autograd.functional.hessian, grad of grad); use "
            "reft_ext.reference for second derivatives"
        )


# lowrank_edit_backward ----------------------------------------------------------------------------


@torch.library.register_fake("reft_ext::lowrank_edit_backward")
def _lowrank_edit_backward_fake(grad_out, h, P, Q, z, output_mask):
    _check_same_device("lowrank_edit_backward", h, grad_out=grad_out, P=P, Q=Q, z=z)
    return _masked_gradients(h, P, output_mask)


def _masked_gradients(h, P, output_mask, Q=None):
    """Fake (grad_h, grad_P, grad_Q, grad_b) of a backward op: h's, P's and Q's (default: P's)
    shapes, b's is P's without the last dimension, (0,) where output_mask does not ask for the
    gradient."""

    def shaped(like, wanted, shape):
        return like.new_empty(shape if wanted else (0,))

    want_h, want_P, want_Q, want_b = output_mask
    return (
        shaped(h, want_h, h.shape),
        shaped(P, want_P, P.shape),
        shaped(P, want_Q, (P if Q is None else Q).shape),
        shaped(P, want_b, P.shape[:-1]),
    )


# lowrank_edit_multi_forward / lowrank_edit_multi_backward -----------------------------------------


@torch.library.register_fake("reft_ext::lowrank_edit_multi_forward")
def _lowrank_edit_multi_forward_fake(h, P, Q, b, adapter):
    _check_same_device("lowrank_edit_multi_forward", h, P=P, Q=Q, b=b, adapter=adapter)
    return torch.empty_like(h), h.new_empty((h.shape[0], P.shape[1]), dtype=P.dtype)


def _lowrank_edit_multi_setup_context(ctx, inputs, output):
    h, P, Q, _, adapter = inputs
    _, z = output
    ctx.save_for_backward(h, P, Q, z, adapter)
    ctx.mark_non_differentiable(z)


def _lowrank_edit_multi_backward(ctx, grad_out, _grad_z):
    h, P, Q, z, adapter = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:4])
    with torch.no_grad():
        grads = torch.ops.reft_ext.lowrank_edit_multi_backward(
            grad_out.contiguous(), h, P, Q, z, adapter, mask
        )
    grads = tuple(g if wanted else None for g, wanted in zip(grads, mask, strict=True))
    return *_first_order(grads, h, P, Q, grad_out), None


torch.library.register_autograd(
    "reft_ext::lowrank_edit_multi_forward",
    _lowrank_edit_multi_backward,
    setup_context=_lowrank_edit_multi_setup_context,
)


@torch.library.register_fake("reft_ext::lowrank_edit_multi_backward")
def _lowrank_edit_multi_backward_fake(grad_out, h, P, Q, z, adapter, output_mask):
    _check_same_device(
        "lowrank_edit_multi_backward", h, grad_out=grad_out, P=P, Q=Q, z=z, adapter=adapter
    )
    return _masked_gradients(h, P, output_mask)


# retract_ -----------------------------------------------------------------------------------------


@torch.library.register_fake("reft_ext::retract_")
def _retract_fake(R, method, check_finite=False):
    return None


@torch.library.register_fake("reft_ext::retract_list_")
def _retract_list_fake(Rs, method, check_finite=False):
    return None


# lowrank_edit_act_forward / lowrank_edit_act_backward ---------------------------------------------

#: The activations of lowrank_edit_act, by the ops' names (csrc/activation.h, same order).
ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")


@torch.library.register_fake("reft_ext::lowrank_edit_act_forward")
def _lowrank_edit_act_forward_fake(h, P, Q, b, activation):
    _check_same_device("lowrank_edit_act_forward", h, P=P, Q=Q, b=b)
    rows = h.shape[0]
    return (
        torch.empty_like(h),
        h.new_empty((rows, P.shape[0]), dtype=P.dtype),
        h.new_empty((rows, Q.shape[0]), dtype=P.dtype),
    )


def _lowrank_edit_act_setup_context(ctx, inputs, output):
    h, P, Q, _, activation = inputs
    _, v, z = output
    ctx.activation = activation
    ctx.save_for_backward(h, P, Q, v, z)  # N×(rp + r) beside the inputs: no N×d intermediate
    ctx.mark_non_differentiable(v, z)


def _lowrank_edit_act_backward(ctx, grad_out, _grad_v, _grad_z):
    h, P, Q, v, z = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:4])
    with torch.no_grad():
        grads = torch.ops.reft_ext.lowrank_edit_act_backward(
            grad_out.contiguous(), h, P, Q, v, z, ctx.activation, mask
        )
    grads = tuple(g if wanted else None for g, wanted in zip(grads, mask, strict=True))
    return (*_first_order(grads, h, P, Q, grad_out), None)


torch.library.register_autograd(
    "reft_ext::lowrank_edit_act_forward",
    _lowrank_edit_act_backward,
    setup_context=_lowrank_edit_act_setup_context,
)


@torch.library.register_fake("reft_ext::lowrank_edit_act_backward")
def _lowrank_edit_act_backward_fake(grad_out, h, P, Q, v, z, activation, output_mask):
    _check_same_device("lowrank_edit_act_backward", h, grad_out=grad_out, P=P, Q=Q, v=v, z=z)
    return _masked_gradients(h, P, output_mask, Q)
