"""Editing selected rows of a block's output in place, with an O(P·d) autograd graph."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class _EditRowsInPlace(torch.autograd.Function):
    """hidden[rows, tokens] ← edit(hidden[rows, tokens]) in place.

    Autograd of the plain ``index_put_`` plus the gather would build two full-size (B, T, d)
    gradients and add them; here backward copies the incoming gradient once and overwrites the P
    edited rows with the edit's input gradient. The edit runs on detached rows in a small graph of
    its own (as activation checkpointing does), so the parameters it reads get exact gradients
    through ``torch.autograd.grad``.
    """

    @staticmethod
    def forward(ctx, hidden, rows, tokens, edit, *params):
        x = hidden[rows, tokens].detach().requires_grad_()
        with torch.enable_grad():
            y = edit(x)
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


def selected(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, tokens) of the entries ``index[b, p] >= 0`` of a LongTensor (B, P): each
    (M,) int64, ``tokens = index[rows, cols]``."""
    rows, cols = (index >= 0).nonzero(as_tuple=True)
    return rows, cols, index[rows, cols]


def edit_selected_(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    edit: Callable[[torch.Tensor], torch.Tensor],
    params: Iterable[nn.Parameter],
) -> None:
    """hidden[rows, tokens] ← edit(hidden[rows, tokens]), in place.

    Args:
        hidden: block output (B, T, d).
        rows, tokens: int64 (M,), M ≥ 1 distinct (row, token) pairs.
        edit: maps (M, d) rows to (M, d), differentiable in its input and in ``params``.
        params: the parameters ``edit`` reads; those that require grad get gradients.
    """
    params = [p for p in params if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        _EditRowsInPlace.apply(hidden, rows, tokens, edit, *params)
    else:
        hidden[rows, tokens] = edit(hidden[rows, tokens]).to(hidden.dtype)


def edit_rows_(hidden: torch.Tensor, index: torch.Tensor, intervention: nn.Module) -> None:
    """Apply ``intervention`` to the rows ``hidden[b, index[b, p]]`` (index ≥ 0), in place.

    Args:
        hidden: block output (B, T, d).
        index: LongTensor (B, P) of token positions, −1 for none; positions distinct per row.
        intervention: module mapping (M, d) rows to (M, d).
    """
    rows, _, tokens = selected(index.to(hidden.device))
    if rows.numel():
        edit_selected_(hidden, rows, tokens, intervention, intervention.parameters())
