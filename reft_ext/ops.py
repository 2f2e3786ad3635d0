"""The compiled ops (``torch.ops.reft_ext.*``): fake kernels for tracing and the autograd Function.

Raw ops (all tensors contiguous; acc = float64 for float64 rows, float32 otherwise):
    lowrank_edit_forward(h (N, d), P (r, d) acc, Q (r, d) acc, b (r,) acc)
        -> (out (N, d), z (N, r) acc)
    lowrank_edit_backward(grad_out (N, d), h, P, Q, z)
        -> (grad_h (N, d), grad_P, grad_Q, grad_b)
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (importing the library registers its ops with the dispatcher)


def cuda_available() -> bool:
    """True when this build of reft_ext contains the CUDA kernels (a GPU need not be present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("reft_ext::lowrank_edit_forward", "CUDA")


@torch.library.register_fake("reft_ext::lowrank_edit_forward")
def _lowrank_edit_forward_fake(h, P, Q, b):
    return torch.empty_like(h), h.new_empty((h.shape[0], P.shape[0]), dtype=P.dtype)


@torch.library.register_fake("reft_ext::lowrank_edit_backward")
def _lowrank_edit_backward_fake(grad_out, h, P, Q, z):
    return torch.empty_like(h), torch.empty_like(P), torch.empty_like(Q), P.new_empty(P.shape[0])


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


class LowRankEditFunction(torch.autograd.Function):
    """out = h + (h Pᵀ + b) Q on contiguous 2-D rows, with the fused backward.

    Inputs as for ``lowrank_edit_forward``. Saves h, P, Q and z (N×r): no N×d intermediate.
    First-order only: with ``create_graph=True`` the gradients carry a node that raises when they
    are differentiated (torch's ``once_differentiable`` does so only when the incoming gradient
    requires grad, so a Hessian came out as silent zeros).
    """

    @staticmethod
    def forward(h: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor):
        out, z = torch.ops.reft_ext.lowrank_edit_forward(h, P, Q, b)
        return out, z

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, P, Q, _ = inputs
        _, z = output
        ctx.save_for_backward(h, P, Q, z)
        ctx.mark_non_differentiable(z)

    @staticmethod
    def backward(ctx, grad_out, _grad_z):
        h, P, Q, z = ctx.saved_tensors
        with torch.no_grad():
            grads = torch.ops.reft_ext.lowrank_edit_backward(grad_out.contiguous(), h, P, Q, z)
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False)
            return grads
        # create_graph=True: the gradients depend on h, P, Q and grad_out. Link them to those in the
        # graph through a node that raises, instead of handing back constants.
        return _FirstOrderOnly.apply(4, h, P, Q, grad_out, *grads)
