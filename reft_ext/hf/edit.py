"""Editing selected rows of a block's output in place, with an O(P·d) autograd graph."""

from __future__ import annotations

import torch
from torch import nn


class _EditRowsInPlace(torch.autograd.Function):
    """hidden[rows, tokens] ← intervention(hidden[rows, tokens]) in place.

    Autograd of the plain ``index_put_`` plus the gather would build two full-size (B, T, d)
    gradients and add them; here backward copies the incoming gradient once and overwrites the P
    edited rows with the intervention's input gradient. The intervention runs on detached rows in a
    small graph of its own (as activation checkpointing does), so its parameters get exact
    gradients through ``torch.autograd.grad``.
    """

    @staticmethod
    def forward(ctx, hidden, rows, tokens, intervention, *params):
        x = hidden[rows, tokens].detach().requires_grad_()
        with torch.enable_grad():
            y = intervention(x)
        hidden[rows, tokens] = y.detach().to(hidden.dtype)
        ctx.mark_dirty(hidden)
        ctx.save_for_backward(rows, tokens)
        ctx.graph = (x, y, params)
        return hidden

    @staticmethod
    def backward(ctx, grad):
        rows, tokens = ctx.saved_tensors
        x, y, params = ctx.graph
        wanted = (x, *params)
        grads = torch.autograd.grad(y, wanted, grad[rows, tokens].to(y.dtype), allow_unused=True)
        grad_hidden = grad.clone()
        grad_hidden[rows, tokens] = grads[0].to(grad.dtype)
        return (grad_hidden, None, None, None, *grads[1:])


def edit_rows_(hidden: torch.Tensor, index: torch.Tensor, intervention: nn.Module) -> None:
    """Apply ``intervention`` to the rows ``hidden[b, index[b, p]]`` (index ≥ 0), in place.

    Args:
        hidden: block output (B, T, d).
        index: LongTensor (B, P) of token positions, −1 for none; positions distinct per row.
        intervention: module mapping (M, d) rows to (M, d).
    """
    index = index.to(hidden.device)
    rows, cols = (index >= 0).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    tokens = index[rows, cols]
    params = [p for p in intervention.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        _EditRowsInPlace.apply(hidden, rows, tokens, intervention, *params)
    else:
        hidden[rows, tokens] = intervention(hidden[rows, tokens]).to(hidden.dtype)
