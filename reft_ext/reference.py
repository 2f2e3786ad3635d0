"""Naive PyTorch composites of the fused ops: what pyreft computes, as a chain of matmuls.

Every op runs in h's dtype (parameters are cast to it), as a plain composite would. Tests use these
in float64 as the exact reference and in low precision as the accuracy yardstick; the benchmarks use
them as the ``naive`` provider. Shapes as in :mod:`reft_ext.functional`.
"""

from __future__ import annotations

import torch


def lowrank_edit(
    h: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """``h + (h Pᵀ + b) Q`` as three matmul-level ops in h's dtype."""
    P, Q, b = (t.to(h.dtype) for t in (P, Q, b))
    return h + (h @ P.T + b) @ Q


def loreft(h: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """pyreft's LoreftIntervention forward: ``h + (W h + b − R h) R`` with R a plain tensor."""
    R, W, b = (t.to(h.dtype) for t in (R, W, b))
    return h + ((h @ W.T + b) - h @ R.T) @ R


def direft(h: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """pyreft's DireftIntervention forward: ``h + (W h + b) R``."""
    R, W, b = (t.to(h.dtype) for t in (R, W, b))
    return h + (h @ W.T + b) @ R


def lowrank_edit_multi(
    h: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor, adapter: torch.Tensor
) -> torch.Tensor:
    """Per-row adapters, ``out[i] = h[i] + (P[a] h[i] + b[a]) Q[a]`` with ``a = adapter[i]``, by
    gathering each row's factors and contracting them (the gather-einsum composite); rows whose
    adapter is −1 are copied. h (N, d); P, Q (A, r, d); b (A, r); adapter (N,) integer."""
    P, Q, b = (t.to(h.dtype) for t in (P, Q, b))
    index = adapter.long().clamp(min=0)
    z = torch.einsum("nd,nrd->nr", h, P[index]) + b[index]
    edit = torch.einsum("nr,nrd->nd", z, Q[index])
    return h + edit * (adapter >= 0).unsqueeze(-1).to(h.dtype)


#: The activations of the activated edit as torch computes them, by the ops' names
#: (reft_ext.ops.ACTIVATIONS).
ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def lowrank_edit_act(
    h: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    Q: torch.Tensor,
    activation: str,
    S: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """pyreft's forward with ``act_fn``: ``h + (act(W h + b) − (S h + c)) Q`` (nothing
    subtracted without S) as matmul-level ops in h's dtype."""
    W, b, Q = (t.to(h.dtype) for t in (W, b, Q))
    z = ACTIVATIONS[activation](h @ W.T + b)
    if S is not None:
        z = z - h @ S.to(h.dtype).T - (0 if c is None else c.to(h.dtype))
    return h + z @ Q
