"""Fuzzing retract_ and keep_orthonormal: shapes, dtypes, layouts, scales, NaN/Inf, methods.

A result is right when its rows are orthonormal and, for a well-conditioned input (κ < 1e3 in
float64), it equals the float64 truth of its method (tests/truth.py: the sign-fixed QR factor, the
polar factor); with check_finite=False a matrix holding NaN or Inf must come back all NaN.
"""

from __future__ import annotations

import itertools
import math

import torch
from fuzzing import RIGHT, assert_clear_error, record
from hypothesis import given
from hypothesis import strategies as st
from truth import max_rel, orth_errors, polar_truth, qr_truth

import reft_ext
from reft_ext.retraction import METHODS

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ORTH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
MATCH_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
BAD = ["dtype", "method", "r-above-d", "r0", "1d", "4d", "expanded", "overlapping", "not-tensor"]


@st.composite
def retraction_cases(draw):
    bad = draw(st.sampled_from(["none"] * 9 + BAD))
    dtype = draw(st.sampled_from(FLOATS))
    if bad == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.complex64, torch.bool]))
    r = 0 if bad == "r0" else draw(st.integers(1, 9))
    d = draw(st.integers(r, 48))
    if bad == "r-above-d":
        r, d = d + 1, d
    return {
        "bad": bad,
        "dtype": dtype,
        "k": draw(st.sampled_from([None, 1, 3])),
        "r": r,
        "d": d,
        "method": "householder" if bad == "method" else draw(st.sampled_from(METHODS)),
        "layout": draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        "scale": draw(st.sampled_from([1.0, 1.0, 1e-30, 1e30, "tiny", "rank-deficient"])),
        "poison": draw(st.sampled_from([None, None, None, math.nan, math.inf])),
        "check_finite": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["r"], case["d"]) if case["k"] is None else (case["k"], case["r"], case["d"])
    if case["bad"] == "1d":
        shape = (case["d"],)
    elif case["bad"] == "4d":
        shape = (2, 2, case["r"], case["d"])
    R = torch.randn(shape, dtype=torch.float64, generator=gen)
    dtype, scale = case["dtype"], case["scale"]
    if scale == "tiny" and dtype.is_floating_point:
        R = R * torch.finfo(dtype).tiny  # near and below the smallest normal number
    elif scale == "rank-deficient" and R.dim() >= 2 and R.shape[-2] > 1:
        R[..., -1, :] = R[..., 0, :] * 2  # a repeated direction
    elif isinstance(scale, float) and dtype in (torch.float64, torch.float32):
        R = R * scale
    if case["poison"] is not None and R.numel():
        R.view(-1)[int(torch.randint(R.numel(), (1,), generator=gen))] = case["poison"]
    R = R.to(dtype)
    if case["layout"] == "transposed" and R.dim() >= 2:
        R = R.mT.contiguous().mT
    elif case["layout"] == "sliced" and R.dim() >= 1:
        wide = torch.zeros(*R.shape[:-1], 2 * R.shape[-1], dtype=R.dtype)
        wide[..., ::2] = R
        R = wide[..., ::2]
    if case["bad"] == "expanded" and R.dim() >= 2:
        R = R[..., :1, :].expand(R.shape)
    elif case["bad"] == "overlapping" and R.dim() >= 2:
        r, d = R.shape[-2:]  # two matrices one row apart: they share r - 1 rows
        R = torch.randn((r + 1) * d, generator=gen).to(dtype).as_strided((2, r, d), (d, d, 1))
    return R


def _shares_memory(R) -> bool:
    """Whether two elements of R have one address (every index visited: R is small here)."""
    addresses = {
        sum(i * s for i, s in zip(index, R.stride(), strict=True))
        for index in itertools.product(*(range(n) for n in R.shape))
    }
    return len(addresses) < R.numel()


def _valid(case, R) -> bool:
    refused_values = case["check_finite"] and not torch.isfinite(R).all()
    if case["bad"] in ("expanded", "overlapping"):  # the layout may turn out harmless
        return not _shares_memory(R) and not refused_values
    return case["bad"] == "none" and not refused_values


@given(retraction_cases())
def test_retract(case):
    R = _build(case)
    if case["bad"] == "not-tensor":
        R = R.tolist()
    before = R.clone() if isinstance(R, torch.Tensor) else None
    try:
        out = reft_ext.retract_(R, case["method"], check_finite=case["check_finite"])
    except (TypeError, ValueError, RuntimeError) as error:
        assert before is None or not _valid(case, R), f"a valid case raised: {error!r}"
        if before is not None and before.dim() >= 2 and before.numel():
            # Matrices holding NaN/Inf are left as they were; a refusal for another reason
            # leaves all of R as it was (with check_finite the others may be retracted).
            originals = before.reshape(-1, *before.shape[-2:])
            for original, now in zip(originals, R.reshape(originals.shape), strict=True):
                if not torch.isfinite(original).all() or "NaN or Inf" not in str(error):
                    assert torch.equal(original.nan_to_num(), now.nan_to_num()), "R changed"
        assert_clear_error(error, ("R", "method"), "retraction")
        return
    assert _valid(case, R), "an invalid case ran"
    assert out is R
    matrices = before.double().reshape(-1, *before.shape[-2:])
    results = out.reshape(-1, *out.shape[-2:])
    for original, result in zip(matrices, results, strict=True):
        if not torch.isfinite(original).all():
            assert torch.isnan(result).all(), "a non-finite matrix did not come back all NaN"
            continue
        assert torch.isfinite(result).all()
        assert orth_errors(result).item() <= ORTH_TOL[R.dtype]
        singular = torch.linalg.svdvals(original)
        if singular.min() > 1e-3 * singular.max():
            truth = polar_truth(original) if case["method"] == "polar" else qr_truth(original)
            assert max_rel(result, truth) <= MATCH_TOL[R.dtype]
    record("retraction", RIGHT)


@given(
    st.lists(st.sampled_from(["step", "add_group", "swap", "zero_grad"]), min_size=1, max_size=6),
    st.integers(0, 2**31 - 1),
)
def test_keep_orthonormal_under_optimizer_changes(events, seed):
    """Groups added after the call and parameters swapped into a group are retracted too: after
    every step each marked R the optimizer holds is orthonormal."""
    torch.manual_seed(seed)
    modules = [reft_ext.LoReFT(12, 3)]
    optimizer = torch.optim.SGD(modules[0].parameters(), lr=0.5)
    reft_ext.keep_orthonormal(optimizer)
    for event in events:
        if event == "add_group":
            modules.append(reft_ext.LoReFT(12, 2))
            optimizer.add_param_group({"params": list(modules[-1].parameters())})
        elif event == "swap":
            modules[0] = reft_ext.LoReFT(12, 3)
            optimizer.param_groups[0]["params"] = list(modules[0].parameters())
        elif event == "zero_grad":
            optimizer.zero_grad()
        h = torch.randn(4, 12)
        loss = sum(m(h).square().sum() for m in modules)
        loss.backward()
        optimizer.step()
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for m in modules:
            if id(m.R) in held:
                assert orth_errors(m.R).item() <= 1e-5, event
    record("keep_orthonormal", RIGHT)
