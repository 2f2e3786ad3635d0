"""The O(d·r²) Householder form of pyreft's orthogonal parametrization (reft_ext.householder)
against torch's own ``nn.utils.parametrizations.orthogonal``, in float64.

torch's ``base`` is a d×d orthogonal matrix whose first r columns are the initial R and whose
others are random; ours keeps it as r reflectors. Given torch the same base (ours expanded to d×d),
both must compute the same R and the same gradient for the same trained X, and train alike.
"""

import pytest
import torch
from torch import nn
from truth import orth_error

import reft_ext
from reft_ext.householder import HouseholderOrthogonal, householder_columns, householder_orthogonal

DTYPE = torch.float64


def _orthonormal_rows(r, d):
    return torch.linalg.qr(torch.randn(d, r, dtype=DTYPE))[0].T.contiguous()


def _twins(r, d):
    """(ours, torch's): modules holding R = the same R0, parametrized our way and torch's way,
    torch's base set to ours (expanded to d×d)."""
    R0 = _orthonormal_rows(r, d)
    ours, theirs = nn.Module(), nn.Module()
    ours.R, theirs.R = nn.Parameter(R0.clone()), nn.Parameter(R0.clone())
    householder_orthogonal(ours)
    nn.utils.parametrizations.orthogonal(theirs, "R")
    p = ours.parametrizations.R[0]
    identity = torch.eye(d, dtype=DTYPE)
    flipped = torch.cat([identity[:r] * p.signs.unsqueeze(-1), identity[r:]])
    with torch.no_grad():
        theirs.parametrizations.R[0].base.copy_(torch.ormqr(p.reflectors, p.tau, flipped))
    return ours, theirs, R0


def _set_original(module, X):
    with torch.no_grad():
        module.parametrizations.R.original.copy_(X)


def _random_original(r, d, scale=0.3):
    X = torch.randn(r, d, dtype=DTYPE) * scale
    X.diagonal().fill_(-1.0)  # torch's sign choice reads int(diag X): keep it at -1 as trained
    return X


@pytest.mark.parametrize("r, d", [(1, 7), (4, 40), (16, 33), (5, 5)])
def test_same_function_and_gradient_as_torch(r, d):
    ours, theirs, R0 = _twins(r, d)
    assert (ours.R - R0).abs().max() < 1e-14  # starts at R0, as torch's does
    X = _random_original(r, d)
    _set_original(ours, X)
    _set_original(theirs, X)
    if r == d:  # torch uses the matrix exponential for square matrices: only ours is checked
        assert orth_error(ours.R) < 1e-13
        return
    torch.testing.assert_close(ours.R, theirs.R, rtol=0, atol=1e-13)
    G = torch.randn(r, d, dtype=DTYPE)
    grads = [
        torch.autograd.grad((m.R * G).sum(), m.parametrizations.R.original)[0]
        for m in (ours, theirs)
    ]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    assert orth_error(ours.R) < 1e-13


def test_trains_like_torch_parametrization():
    """AdamW on the same loss from the same X: the same R after 10 steps (float64)."""
    ours, theirs, _ = _twins(3, 24)
    target = torch.randn(3, 24, dtype=DTYPE)
    results = []
    for module in (ours, theirs):
        opt = torch.optim.AdamW([module.parametrizations.R.original], lr=0.05, weight_decay=0.0)
        for _ in range(10):
            opt.zero_grad()
            ((module.R - target) ** 2).sum().backward()
            opt.step()
        results.append(module.R.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-11)
    assert orth_error(results[0]) < 1e-13


def test_householder_columns_matches_torch_and_gradcheck():
    A = (torch.randn(30, 6, dtype=DTYPE) * 0.5).tril(-1).requires_grad_()
    tau = (2.0 / (1.0 + (A * A).sum(0))).detach().requires_grad_()
    torch.testing.assert_close(
        householder_columns(A, tau), torch.linalg.householder_product(A, tau), rtol=0, atol=1e-14
    )
    assert torch.autograd.gradcheck(householder_columns, (A, tau))


def test_assignment_resets_base_and_original():
    module = nn.Module()
    module.R = nn.Parameter(_orthonormal_rows(2, 10))
    householder_orthogonal(module)
    _set_original(module, _random_original(2, 10))
    R1 = _orthonormal_rows(2, 10)
    module.R = R1
    torch.testing.assert_close(module.R, R1, rtol=0, atol=1e-14)
    expected = torch.zeros(2, 10, dtype=DTYPE)
    expected.diagonal().fill_(-1.0)
    assert torch.equal(module.parametrizations.R.original, expected)


@pytest.mark.parametrize("cls", [reft_ext.LoReFT, reft_ext.ConsReFT, reft_ext.LoBiReFT])
def test_intervention_option_trains_with_orthonormal_R(cls):
    """orthogonality="householder": R orthonormal at init and after Adam steps (float32), the
    parametrization's original trained, a state dict that round-trips."""
    module = cls(64, 4, orthogonality="householder")
    assert orth_error(module.R) < 1e-6
    h, target = torch.randn(32, 64), torch.randn(32, 64)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.0)
    before = module.R.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        (module(h) - target).square().mean().backward()
        opt.step()
    assert not torch.allclose(module.R, before)
    assert orth_error(module.R) < 1e-5
    clone = cls(64, 4, orthogonality="householder")
    clone.load_state_dict(module.state_dict())
    torch.testing.assert_close(clone(h), module(h))


def test_weight_decay_zeroes_R_as_in_torch():
    """torch's map multiplies column i by int(X[i, i]): weight decay pulls the diagonal from -1
    toward 0, int() then gives 0 and R loses its rows; the same function does the same (which is
    why the README says to keep the original out of weight decay)."""
    ours, theirs, _ = _twins(2, 12)
    for module in (ours, theirs):
        opt = torch.optim.AdamW([module.parametrizations.R.original], lr=1e-3, weight_decay=0.1)
        opt.zero_grad()
        module.R.sum().backward()
        opt.step()
        assert torch.count_nonzero(module.R) == 0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="R must be \\(r, d\\) with 1 <= r <= d"):
        HouseholderOrthogonal(torch.randn(5, 3))
    module = nn.Module()
    module.R = nn.Parameter(_orthonormal_rows(2, 10))
    householder_orthogonal(module)
    with pytest.raises(ValueError, match="R must have shape \\(2, 10\\)"):
        module.parametrizations.R[0].right_inverse(torch.randn(3, 10, dtype=DTYPE))


def test_reft_model_adapter_with_householder_saves_and_loads(tmp_path):
    """ReftConfig(orthogonality="householder"): the adapter folder holds the original and the
    reflectors, and a fresh model loads the same function (same logits)."""
    from tiny_models import tiny_llama

    config = reft_ext.ReftConfig(layers=[0, 1], rank=2, orthogonality="householder")
    reft_model = reft_ext.get_reft_model(tiny_llama(), config)
    with torch.no_grad():
        for module in reft_model.interventions.values():
            module.parametrizations.R.original.add_(0.1 * torch.randn_like(module.R))
    ids = torch.randint(3, 96, (2, 7))
    expected = reft_model(input_ids=ids).logits
    reft_model.save_pretrained(tmp_path)
    loaded = reft_ext.ReftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)


def test_every_orthogonality_starts_from_the_same_weights():
    """Under one seed, a stack of interventions gets the same initial R, W and b whichever way R
    is kept orthonormal (torch's parametrization draws its base from a forked RNG), so the ways
    can be compared from the same start."""
    starts = []
    for orthogonality in ("retraction", "parametrization", "householder"):
        torch.manual_seed(0)
        modules = [reft_ext.LoReFT(32, 2, orthogonality=orthogonality) for _ in range(3)]
        starts.append([t.detach() for m in modules for t in (m.R, m.W, m.b)])
    for other in starts[1:]:
        for a, b in zip(starts[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
