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
parametrization as pyreft does (for comparison; its state_dict keys are torch's);
``"householder"`` computes the same function of the same trained X in O(d·r²)
(reft_ext.householder: the d×d base kept as r reflectors); ``None`` leaves R free. Dropout, when
set, applies to the edit only (not to h) and is off in ``eval()``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from .dtypes import accumulation_dtype
from .functional import direft, loreft, lowrank_edit
from .householder import householder_orthogonal
from .retraction import StiefelParameter

#: How R is kept orthonormal (``orthogonality=``); None: R is left free.
ORTHOGONALITY = ("retraction", "parametrization", "householder", None)


def orthonormal_parameter(R: torch.Tensor, orthogonality: str | None) -> nn.Parameter:
    """R as the parameter ``orthogonality`` trains: a :class:`StiefelParameter` (retracted after
    each optimizer step) for ``"retraction"``, else a plain parameter (None: left free; the two
    parametrizations are registered on the module afterwards by :func:`parametrize_orthonormal`).
    """
    return StiefelParameter(R) if orthogonality == "retraction" else nn.Parameter(R)


def parametrize_orthonormal(module: nn.Module, name: str, orthogonality: str | None) -> None:
    """Register ``orthogonality``'s parametrization of ``module.<name>`` (r, d), if it has one:
    torch's orthogonal parametrization (pyreft's, O(d²·r) per read) or its O(d·r²) form
    (:mod:`reft_ext.householder`)."""
    if orthogonality == "parametrization":
        # torch draws the base's other columns at random: from a forked RNG, so that the next
        # module's initial weights do not depend on this choice.
        device = getattr(module, name).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            nn.utils.parametrizations.orthogonal(module, name)
    elif orthogonality == "householder":
        householder_orthogonal(module, name)


class _Intervention(nn.Module):
    """Shared parameters and plumbing: R (rank, embed_dim), optional W, b (rank,).

    Each subclass declares its registry entry: ``name`` (ReftConfig's ``intervention``),
    ``orthonormal`` (whether R is kept orthonormal, i.e. takes ``orthogonality=``),
    ``has_source_weight`` (whether it has W), and :meth:`factors`, its (P, Q, b) in the primitive
    h + (h Pᵀ + b) Q.
    """

    name: ClassVar[str]
    orthonormal: ClassVar[bool] = True
    has_source_weight: ClassVar[bool] = True

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

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not (is_int(embed_dim) and is_int(rank) and 1 <= rank <= embed_dim):
            raise ValueError(
                f"{name}: need integers 1 <= rank <= embed_dim, got rank={rank!r}, "
                f"embed_dim={embed_dim!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        if orthogonality not in ORTHOGONALITY:
            raise ValueError(
                f"{name}: orthogonality must be one of {ORTHOGONALITY}, got {orthogonality!r}"
            )
        self.embed_dim, self.rank, self.dropout = embed_dim, rank, dropout
        self.orthogonality = orthogonality
        factory = {"dtype": dtype or torch.float32, "device": device}
        R = torch.empty(rank, embed_dim, **factory)
        self.R = orthonormal_parameter(R, orthogonality)
        if self.has_source_weight:
            self.W = nn.Parameter(torch.empty(rank, embed_dim, **factory))
        self.b = nn.Parameter(torch.empty(rank, **factory))
        self.reset_parameters()
        parametrize_orthonormal(self, "R", orthogonality)

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

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P (rank, embed_dim), Q (rank, embed_dim), b (rank,)) of the primitive, in ``dtype``."""
        raise NotImplementedError

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """h + edit(h) through the fused op; h (..., embed_dim), result h's shape and dtype."""
        return lowrank_edit(h, *self.factors(accumulation_dtype(h.dtype)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Edited hidden states, h's shape and dtype; h is (..., embed_dim)."""
        if self.training and self.dropout > 0:
            return self._dropout_edit(h)
        return self.edit(h)

    def _dropout_edit(self, h: torch.Tensor) -> torch.Tensor:
        """h + dropout((h Pᵀ + b) Q): the edit itself is computed (in the accumulation dtype) and
        dropped, not recovered as out − h (an extra pass that in bfloat16 carries h's rounding)."""
        acc = accumulation_dtype(h.dtype)
        P, Q, b = self.factors(acc)
        edit = nn.functional.linear(h.to(acc), P, b) @ Q
        dropped = nn.functional.dropout(edit, self.dropout, training=True)
        return (h.to(acc) + dropped).to(h.dtype)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, rank={self.rank}, dropout={self.dropout}, "
            f"orthogonality={self.orthogonality!r}"
        )


class _FreeR(_Intervention):
    """An intervention whose R is not kept orthonormal (no ``orthogonality`` argument)."""

    orthonormal = False

    def __init__(self, embed_dim, rank, dropout=0.0, dtype=None, device=None):
        super().__init__(embed_dim, rank, dropout, dtype, device, orthogonality=None)


class LoReFT(_Intervention):
    """LoReFT: h + Rᵀ(W h + b − R h) with orthonormal rows of R (rank, embed_dim)."""

    name = "loreft"

    def factors(self, dtype):
        return self.W.to(dtype) - self.R.to(dtype), self.R.to(dtype), self.b.to(dtype)

    def edit(self, h):
        return loreft(h, self.R, self.W, self.b)


class NoReFT(_FreeR):
    """NoReFT: LoReFT's formula with R left free (no orthogonality)."""

    name = "noreft"
    factors = LoReFT.factors
    edit = LoReFT.edit


class DiReFT(_FreeR):
    """DiReFT: h + (W h + b) R, R free (no orthogonality, no −R h term)."""

    name = "direft"

    def factors(self, dtype):
        return self.W.to(dtype), self.R.to(dtype), self.b.to(dtype)

    def edit(self, h):
        return direft(h, self.R, self.W, self.b)


class ConsReFT(_Intervention):
    """ConsReFT: h + Rᵀ(b − R h), a constant source b in the orthonormal subspace R."""

    name = "consreft"
    has_source_weight = False

    def factors(self, dtype):
        return -self.R.to(dtype), self.R.to(dtype), self.b.to(dtype)


class LoBiReFT(_Intervention):
    """LoBiReFT: h + Rᵀ b, a learned bias in the orthonormal subspace R."""

    name = "lobireft"
    has_source_weight = False

    def factors(self, dtype):
        return torch.zeros_like(self.R, dtype=dtype), self.R.to(dtype), self.b.to(dtype)

    def edit(self, h):
        # The edit does not depend on h: one (embed_dim,) row added in the accumulation dtype,
        # rounded once, with no projection of h against a zero P.
        acc = accumulation_dtype(h.dtype)
        return (h.to(acc) + self.b.to(acc) @ self.R.to(acc)).to(h.dtype)


#: The intervention registry: ReftConfig's ``intervention`` name -> class. ReftConfig's accepted
#: names, ReftModel's modules and the pyreft importer all derive from it.
INTERVENTIONS: dict[str, type[_Intervention]] = {
    cls.name: cls for cls in (LoReFT, NoReFT, DiReFT, ConsReFT, LoBiReFT)
}
