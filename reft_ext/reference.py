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
