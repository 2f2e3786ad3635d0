"""Independent float64 truths and error measures shared by the tests (none taken from reft_ext).

Low-rank edits are written with einsum; the retraction's truths come from torch.linalg: the QR
factor with the signs fixed so that the triangular factor has a positive diagonal, and the polar
factor U Vᵀ of the SVD.
"""

import torch

# Relative tolerance (to the largest magnitude of the expected tensor) of an edit, by result dtype.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def project(h, A):
    """h Aᵀ: (..., d) × (r, d) → (..., r)."""
    return torch.einsum("...d,rd->...r", h, A)


def expand(z, B):
    """z B: (..., r) × (r, d) → (..., d)."""
    return torch.einsum("...r,rd->...d", z, B)


def truth_lowrank_edit(h, P, Q, b):
    return h + expand(project(h, P) + b, Q)


def truth_loreft(h, R, W, b):
    return h + expand(project(h, W) + b - project(h, R), R)


def truth_direft(h, R, W, b):
    return h + expand(project(h, W) + b, R)


#: The activated edit's activations as torch computes them (torch.nn.functional's formulas).
TRUTH_ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def truth_lowrank_edit_act(h, W, b, Q, activation, S=None, c=None):
    """h + (act(h Wᵀ + b) − (h Sᵀ + c)) Q (no subtraction without S; c = 0 without c)."""
    z = TRUTH_ACTIVATIONS[activation](project(h, W) + b)
    if S is not None:
        z = z - project(h, S) - (0 if c is None else c)
    return h + expand(z, Q)


def truth_lowrank_edit_multi(h, P, Q, b, adapter):
    """Row by row: h[i] + (P[a] h[i] + b[a]) Q[a] for a = adapter[i] ≥ 0, else h[i] (each row a
    one-row batch of truth_lowrank_edit: nothing shared with a grouping of rows by adapter)."""
    rows = []
    for i, a in enumerate(adapter.tolist()):
        row = h[i : i + 1]
        rows.append(row if a < 0 else truth_lowrank_edit(row, P[a], Q[a], b[a]))
    return torch.cat(rows) if rows else h.clone()


def truth_multi_and_grads(leaves, adapter, grad_out):
    """(out64, grads64): truth_lowrank_edit_multi on float64 copies of ``leaves`` (h, P, Q, b)
    and the gradients of ⟨grad_out, out⟩ with respect to each (zeros for adapters no row uses)."""
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64 = truth_lowrank_edit_multi(*leaves64, adapter.cpu())
    grads = torch.autograd.grad(out64, leaves64, grad_out.double(), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves64, grads, strict=True)]
    return out64.detach(), grads


def assert_close_rel(actual, expected, rel=None):
    """``actual`` matches float64 ``expected`` within ``rel`` of expected's largest magnitude."""
    rel = REL_TOL[actual.dtype] if rel is None else rel
    assert actual.shape == expected.shape
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rel, atol=rel * max(scale, 1e-300))


def max_abs_err(actual, expected):
    """max |actual − expected| in float64."""
    return (actual.double() - expected.double()).abs().max().item()


def max_rel(actual, expected):
    """max |actual − expected| / max |expected|, in float64."""
    actual, expected = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def orth_errors(Q):
    """max |Q Qᵀ − I| of each (r, d) matrix of Q (..., r, d), in float64: a (...) tensor."""
    Q = Q.detach().to(torch.float64)
    eye = torch.eye(Q.shape[-2], dtype=torch.float64, device=Q.device)
    return (Q @ Q.mT - eye).abs().amax(dim=(-2, -1))


def orth_error(Q):
    """max |Q Qᵀ − I| in float64 over every matrix of Q (..., r, d)."""
    return orth_errors(Q).max().item()


def qr_truth(R):
    """The Q with orthonormal rows and R = T Q, T lower triangular with diag(T) > 0 (float64)."""
    Q, T = torch.linalg.qr(R.detach().to(torch.float64).mT)
    signs = torch.sign(torch.diagonal(T, dim1=-2, dim2=-1))
    signs[signs == 0] = 1
    return (Q * signs.unsqueeze(-2)).mT


def polar_truth(R):
    """U Vᵀ of the thin SVD R = U S Vᵀ (float64)."""
    U, _, Vh = torch.linalg.svd(R.detach().to(torch.float64), full_matrices=False)
    return U @ Vh
