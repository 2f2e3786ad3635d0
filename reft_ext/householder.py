"""pyreft's orthogonal parametrization of R, computed in O(d·r²) instead of O(d²·r).

pyreft keeps R orthonormal with torch's ``nn.utils.parametrizations.orthogonal`` on its (d, r)
rotation: for a non-square matrix torch uses the Householder map with trivialization,

    Rᵀ(X) = base · HH(X),   HH(X) = householder_product(tril(X, -1), τ(X)) · diag(int(diag X)),

where τ_i = 2 / (1 + ‖column i of tril(X, -1)‖²), ``base`` is a d×d orthogonal buffer whose first r
columns are the R it was initialised (or last assigned) with, and X is the trained parameter,
starting at −I. Every read builds the d×d ``base`` product: O(d²·r) time and a d×d buffer (64 MiB
at d = 4096 in float32) per intervention.

:class:`HouseholderOrthogonal` computes the same function of X with ``base`` kept as the r
Householder reflectors of ``geqrf(R₀ᵀ)`` (with its signs), applied by ``torch.ormqr``, and HH(X)
by :func:`householder_columns` in the compact (UT) form of the reflectors' product, whose backward
needs no d×d matrix (torch's own ``householder_product`` backward builds them: 1.1 s at d = 4096,
r = 8 on one CPU thread): O(d·r²) per read, forward and backward, and O(d·r²) memory. The base's
first r columns are R₀ᵀ as torch's are; its other d − r columns, which torch draws at random, are
the reflectors' own completion, so for a given X the two parametrizations differ only by a
rotation of the orthogonal complement of R₀'s row space, and with the same ``base`` they are the
same function (tested).

Like torch's (and so pyreft's), the map multiplies column i by ``int(X[i, i])``, which autograd
does not differentiate: the diagonal starts at −1 and an optimizer leaves it there, but weight
decay pulls it toward 0, after which ``int`` gives 0 and R loses rows. Keep the original out of
weight decay (pyreft's trainers use none by default).
"""

from __future__ import annotations

import torch
from torch import nn


def householder_columns(A: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.householder_product(A, tau)`` for A (d, r), d ≥ r, strictly lower
    triangular (the diagonal is the implied 1): the first r columns of H_1 ⋯ H_r, H_i = I − τ_i
    v_i v_iᵀ with v_i = e_i + A[:, i]; (d, r).

    In the compact form of the UT transform (Joffrain et al., 2006), H_1 ⋯ H_r = I − V S⁻¹ Vᵀ with
    S = diag(1/τ) + striu(VᵀV) upper triangular (exact for τ_i = 2 / ‖v_i‖², as here), so the
    columns are [I; 0] − V S⁻¹ V[:r]ᵀ: a Gram matrix, an r×r triangular solve and a product, with
    autograd's backward through them, O(d·r²) either way and a fixed number of ops whatever r
    (torch's own ``householder_product`` backward builds d×d matrices: 1.1 s at d = 4096, r = 8 on
    one CPU thread).
    """
    d, r = A.shape
    V = A.tril(-1) + torch.eye(d, r, dtype=A.dtype, device=A.device)
    S = (V.mT @ V).triu(1) + torch.diag(tau.reciprocal())
    M = torch.linalg.solve_triangular(S, V[:r].mT, upper=True)  # S⁻¹ V[:r]ᵀ (r, r)
    return torch.eye(d, r, dtype=A.dtype, device=A.device) - V @ M


class HouseholderOrthogonal(nn.Module):
    """A parametrization (``torch.nn.utils.parametrize``) of R (r, d), r ≤ d, with orthonormal
    rows: R = (base · HH(X))ᵀ for the unconstrained original X (r, d), as torch's orthogonal
    parametrization of a (d, r) weight computes it, with ``base`` as r Householder reflectors.

    Buffers: ``reflectors`` (d, r) and ``tau`` (r,) from ``torch.geqrf(R₀ᵀ)``, ``signs`` (r,) the
    signs of its triangular factor's diagonal (so that base's first r columns are exactly R₀ᵀ).
    Assigning to the parametrized R (``module.R = R_new``) resets the base to R_new and X to −I,
    as torch's does.
    """

    def __init__(self, R: torch.Tensor):
        super().__init__()
        if R.dim() != 2 or not 1 <= R.shape[0] <= R.shape[1]:
            raise ValueError(
                f"HouseholderOrthogonal: R must be (r, d) with 1 <= r <= d, got {tuple(R.shape)}"
            )
        self.register_buffer("reflectors", torch.empty(R.shape[1], R.shape[0], dtype=R.dtype))
        self.register_buffer("tau", torch.empty(R.shape[0], dtype=R.dtype))
        self.register_buffer("signs", torch.empty(R.shape[0], dtype=R.dtype))
        self.to(R.device)
        self._set_base(R)

    @torch.no_grad()
    def _set_base(self, R: torch.Tensor) -> None:
        """base := the reflectors of R's QR (R's rows orthonormalized first, as torch does)."""
        reflectors, tau = torch.geqrf(R.detach().mT.to(self.reflectors.dtype))
        self.reflectors.copy_(reflectors)
        self.tau.copy_(tau)
        self.signs.copy_(torch.where(reflectors.diagonal() < 0, -1.0, 1.0))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """R (r, d) from the original X (r, d): torch's Householder map of Xᵀ, then the base."""
        A = X.mT.tril(-1)  # (d, r): the reflectors of HH, unit diagonal implied
        tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
        Q = householder_columns(A, tau)
        Q = Q * X.diagonal().int().unsqueeze(-2)  # torch's sign choice, from X's diagonal
        r = Q.shape[-1]
        # base · Q = W · (S ⊕ I) · Q with W the reflectors' product and S = diag(signs).
        Q = torch.cat([Q[:r] * self.signs.unsqueeze(-1), Q[r:]], dim=0)
        return torch.ormqr(self.reflectors, self.tau, Q).mT

    @torch.no_grad()
    def right_inverse(self, R: torch.Tensor) -> torch.Tensor:
        """Assigning R: the base becomes R's (its rows orthonormalized, as torch's) and X = −I,
        whose forward is those orthonormalized rows (R itself when they already are)."""
        expected = (self.tau.shape[0], self.reflectors.shape[0])
        if tuple(R.shape) != expected:
            raise ValueError(
                f"HouseholderOrthogonal: R must have shape {expected}, got {tuple(R.shape)}"
            )
        self._set_base(R)
        X = torch.zeros_like(R)
        X.diagonal().fill_(-1.0)
        return X


def householder_orthogonal(module: nn.Module, name: str = "R") -> nn.Module:
    """Parametrize ``module.<name>`` (r, d) with :class:`HouseholderOrthogonal`, starting from its
    current value (made orthonormal); returns ``module``. The trained tensor is
    ``module.parametrizations.<name>.original`` (r, d), as with torch's orthogonal
    parametrization."""
    weight = getattr(module, name)
    nn.utils.parametrize.register_parametrization(module, name, HouseholderOrthogonal(weight))
    return module
