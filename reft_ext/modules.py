"""ReFT interventions as modules: LoReFT and its variants, all on the fused low-rank edit.

Every module maps hidden states h (..., embed_dim) to h + (h Pᵀ + b) Q, the one fused primitive
(reft_ext.functional):

| module   | P      | Q | parameters | orthonormal R |
|----------|--------|---|------------|---------------|
| LoReFT   | W − R  | R | R, W, b    | yes (retraction by default) |
| NoReFT   | W − R  | R | R, W, b    | no |
| DiReFT   | W      | R | R, W, b    | no |
| ConsReFT | −R     | R | R, b       | yes |
| LoBiReFT | 0      | R | R, b       | yes |

Orthogonality (``orthogonality=``): ``"retraction"`` marks R for :func:`reft_ext.keep_orthonormal`,
which retracts it after each optimizer step; ``"parametrization"`` uses torch's orthogonal
parametrization as pyreft does (for comparison; its state_dict keys are torch's); ``None`` leaves
R free. Dropout, when set, applies to the edit only (not to h) and is off in ``eval()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .functional import loreft, lowrank_edit
from .retraction import StiefelParameter

_ORTHOGONALITY = ("retraction", "parametrization", None)


class _Intervention(nn.Module):
    """Shared parameters and plumbing: R (rank, embed_dim), optional W, b (rank,)."""

    has_source_weight = True
    orthonormal_by_default = True

    def __init__(
        self,
        embed_dim: int,
        rank: int,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        orthogonality: str | None = "retraction",
    ):
        super().__init__()
        name = type(self).__name__
        if not (isinstance(embed_dim, int) and isinstance(rank, int) and 1 <= rank <= embed_dim):
            raise ValueError(
                f"{name}: need integers 1 <= rank <= embed_dim, got rank={rank!r}, "
                f"embed_dim={embed_dim!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        if orthogonality not in _ORTHOGONALITY:
            raise ValueError(
                f"{name}: orthogonality must be 'retraction', 'parametrization' or None, "
                f"got {orthogonality!r}"
            )
        self.embed_dim, self.rank, self.dropout = embed_dim, rank, dropout
        self.orthogonality = orthogonality
        factory = {"dtype": dtype or torch.float32, "device": device}
        R = torch.empty(rank, embed_dim, **factory)
        self.R = StiefelParameter(R) if orthogonality == "retraction" else nn.Parameter(R)
        if self.has_source_weight:
            self.W = nn.Parameter(torch.empty(rank, embed_dim, **factory))
        self.b = nn.Parameter(torch.empty(rank, **factory))
        self.reset_parameters()
        if orthogonality == "parametrization":
            nn.utils.parametrizations.orthogonal(self, "R")

    def reset_parameters(self) -> None:
        """R: random orthonormal rows; W, b: as pyreft's ``nn.Linear(embed_dim, rank)`` source."""
        with torch.no_grad():
            Q = torch.linalg.qr(torch.randn(self.embed_dim, self.rank, dtype=torch.float64))[0]
            if hasattr(self, "parametrizations"):  # set through the parametrization's inverse
                self.R = Q.T.to(self.b.dtype)
            else:
                self.R.copy_(Q.T)
            bound = 1.0 / math.sqrt(self.embed_dim)
            if self.has_source_weight:
                nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
            nn.init.uniform_(self.b, -bound, bound)

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """h + edit(h) through the fused op (subclasses pick P and Q)."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Edited hidden states, h's shape and dtype; h is (..., embed_dim)."""
        out = self.edit(h)
        if self.training and self.dropout > 0:
            out = h + F.dropout(out - h, self.dropout, training=True)
        return out

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, rank={self.rank}, dropout={self.dropout}, "
            f"orthogonality={self.orthogonality!r}"
        )


class LoReFT(_Intervention):
    """LoReFT: h + Rᵀ(W h + b − R h) with orthonormal rows of R (rank, embed_dim)."""

    def edit(self, h):
        return loreft(h, self.R, self.W, self.b)


class NoReFT(_Intervention):
    """NoReFT: LoReFT's formula with R left free (no orthogonality)."""

    def __init__(self, embed_dim, rank, dropout=0.0, dtype=None, device=None):
        super().__init__(embed_dim, rank, dropout, dtype, device, orthogonality=None)

    def edit(self, h):
        return loreft(h, self.R, self.W, self.b)


class DiReFT(_Intervention):
    """DiReFT: h + (W h + b) R, R free (no orthogonality, no −R h term)."""

    def __init__(self, embed_dim, rank, dropout=0.0, dtype=None, device=None):
        super().__init__(embed_dim, rank, dropout, dtype, device, orthogonality=None)

    def edit(self, h):
        return lowrank_edit(h, self.W, self.R, self.b)


class ConsReFT(_Intervention):
    """ConsReFT: h + Rᵀ(b − R h), a constant source b in the orthonormal subspace R."""

    has_source_weight = False

    def edit(self, h):
        return lowrank_edit(h, -self.R, self.R, self.b)


class LoBiReFT(_Intervention):
    """LoBiReFT: h + Rᵀ b, a learned bias in the orthonormal subspace R."""

    has_source_weight = False

    def edit(self, h):
        return lowrank_edit(h, torch.zeros_like(self.R), self.R, self.b)
