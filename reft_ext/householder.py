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
by :class:`_HouseholderColumns`, whose backward walks the r reflectors (torch's own
``householder_product`` backward builds d×d matrices: 1.1 s at d = 4096, r = 8 on one CPU thread):
O(d·r²) per read, forward and backward, and O(d·r²) memory. The base's first r columns are R₀ᵀ
as torch's are; its other d − r columns, which torch draws at random, are the reflectors' own
completion, so for a given X the two parametrizations differ only by a rotation of the orthogonal
complement of R₀'s row space, and with the same ``base`` they are the same function (tested).

Like torch's (and so pyreft's), the map multiplies column i by ``int(X[i, i])``, which autograd
does not differentiate: the diagonal starts at −1 and an optimizer leaves it there, but weight
decay pulls it toward 0, after which ``int`` gives 0 and R loses rows. Keep the original out of
weight decay (pyreft's trainers use none by default).
"""

from __future__ import annotations

import torch
from torch import nn


class _HouseholderColumns(torch.autograd.Function):
    """The first r columns of H_1 ⋯ H_r, H_i = I − τ_i v_i v_iᵀ with v_i = e_i + A[:, i]
    (``torch.linalg.householder_product(A, tau)`` for A (d, r) strictly lower triangular), with
    an O(d·r²) backward.

    Forward applies H_r, …, H_1 to [I_r; 0] and keeps each H_i's input Y_{i+1} (r matrices d×r).
    Backward, for Y_i = Y_{i+1} − τ_i v_i w_iᵀ with w_i = Y_{i+1}ᵀ v_i and G_i = ∂L/∂Y_i:
    ∂L/∂Y_{i+1} = G_i − τ_i v_i (v_iᵀ G_i), ∂L/∂v_i = −τ_i (G_i w_i + Y_{i+1} G_iᵀ v_i),
    ∂L/∂τ_i = −v_iᵀ G_i w_i; ∂L/∂A[:, i] is ∂L/∂v_i below the diagonal.
    """

    @staticmethod
    def forward(A: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        d, r = A.shape
        V = A.tril(-1) + torch.eye(d, r, dtype=A.dtype, device=A.device)
        Y = torch.eye(d, r, dtype=A.dtype, device=A.device)
        inputs = []
        for i in reversed(range(r)):
            inputs.append(Y)
            v = V[:, i]
            Y = Y - tau[i] * torch.outer(v, v @ Y)
        return Y, V, torch.stack(inputs[::-1])  # inputs[i]: H_i's input

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, V, Ys = output
        ctx.save_for_backward(inputs[1], V, Ys)
        ctx.mark_non_differentiable(V, Ys)

    @staticmethod
    def backward(ctx, G, _grad_V, _grad_Ys):
        tau, V, Ys = ctx.saved_tensors
        d, r = V.shape
        grad_V = torch.empty_like(V)
        grad_tau = torch.empty_like(tau)
        for i in range(r):
            v, Y = V[:, i], Ys[i]
            w = v @ Y  # (r,)
            Gv = v @ G  # (r,) = G_iᵀ v
            grad_tau[i] = -(Gv @ w)
            grad_V[:, i] = -tau[i] * (G @ w + Y @ Gv)
            G = G - tau[i] * torch.outer(v, Gv)
        return grad_V.tril(-1), grad_tau


def householder_columns(A: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.householder_product(A, tau)`` for A (d, r), d ≥ r, strictly lower
    triangular (the diagonal is the implied 1), with an O(d·r²) backward; (d, r)."""
    return _HouseholderColumns.apply(A, tau)[0]


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
