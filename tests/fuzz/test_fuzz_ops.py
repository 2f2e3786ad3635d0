"""Fuzzing the public edits (lowrank_edit, loreft, direft) and, in child processes, the raw ops.

Every case ends in a right result (float64 truth, tests/truth.py) or an error naming the argument;
a case that is valid by the documented contract must give the result. Raw-op cases run in a child
process, so a crash (a signal, an abort) fails the test naming the case instead of killing the run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from fuzzing import EXAMPLES, RIGHT, assert_clear_error, assert_right, record
from hypothesis import Phase, given, note, settings
from hypothesis import strategies as st
from truth import truth_direft, truth_loreft, truth_lowrank_edit

import reft_ext
from reft_ext import reference

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
OTHER_DTYPES = [torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn]
OPS = {
    "lowrank_edit": (reft_ext.lowrank_edit, truth_lowrank_edit, reference.lowrank_edit, "PQ"),
    "loreft": (reft_ext.loreft, truth_loreft, reference.loreft, "RW"),
    "direft": (reft_ext.direft, truth_direft, reference.direft, "RW"),
}
VALUES = ["normal", "nan", "inf", "subnormal", "large", "zero"]


def _values(shape, dtype, kind, gen):
    """A float64 tensor of ``shape`` whose entries are of ``kind`` once stored in ``dtype``."""
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    if not dtype.is_floating_point or dtype == torch.float8_e4m3fn:
        return x
    info = torch.finfo(dtype)
    if kind == "subnormal":
        return x * info.tiny * 0.25
    if kind == "large":  # products of two stay far from overflow in the accumulation dtype
        return x * info.max**0.2
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.float64)
    if kind in ("nan", "inf") and x.numel():
        flat = x.view(-1)
        flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = (
            math.nan if kind == "nan" else -math.inf
        )
    return x


BAD_EDIT = ["h-dtype", "params-dtype", "zero-d-h", "r0", "sparse", "bad-d", "bad-r", "bias-0d"]


@st.composite
def edit_cases(draw):
    """About half the cases are valid by the documented contract; the others have one thing
    wrong (``bad``)."""
    bad = draw(st.sampled_from(["none"] * 8 + BAD_EDIT))
    dtype = draw(st.sampled_from(OTHER_DTYPES if bad == "h-dtype" else FLOATS))
    params = draw(st.sampled_from(["same", "float32"]))
    if bad == "params-dtype":
        params = draw(
            st.sampled_from(["int64", "float64"] if dtype != torch.float64 else ["int64"])
        )
    return {
        "op": draw(st.sampled_from(sorted(OPS))),
        "h_dtype": dtype,
        "params": params,
        "lead": draw(st.lists(st.integers(0, 5), max_size=2)),
        "d": draw(st.sampled_from([0, 1, 2, 7, 33])),
        "r": 0 if bad == "r0" else draw(st.sampled_from([1, 2, 5, 40])),
        "layout": "sparse"
        if bad == "sparse"
        else draw(st.sampled_from(["contiguous", "transposed", "expanded", "sliced"])),
        "shapes": bad if bad in ("bad-d", "bad-r", "bias-0d") else "ok",
        "values": draw(st.sampled_from(VALUES)),
        "where": draw(st.sampled_from(["h", "A", "b"])),
        "grads": draw(
            st.sampled_from([(False, False), (True, True), (True, False), (False, True)])
        ),
        "zero_d_h": bad == "zero-d-h",
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, d, r = case["h_dtype"], case["d"], case["r"]
    pdtype = {"same": dtype, "float32": torch.float32, "float64": torch.float64}.get(
        case["params"], torch.int64
    )
    shape = () if case["zero_d_h"] else (*case["lead"], d)
    kinds = {k: case["values"] if case["where"] == k else "normal" for k in "hAb"}
    h = _values(shape, dtype, kinds["h"], gen)
    if case["layout"] == "transposed" and h.dim() >= 2:
        h = h.mT.contiguous().mT
    elif case["layout"] == "sliced" and h.dim() >= 1:
        wide = torch.zeros(*h.shape[:-1], 2 * d, dtype=h.dtype)
        wide[..., ::2] = h
        h = wide[..., ::2]
    elif case["layout"] == "expanded" and h.dim() >= 1:
        h = h[..., :1, :].expand(*h.shape) if h.dim() >= 2 and h.shape[-2] else h
    A_shape = (r, d + 1 if case["shapes"] == "bad-d" else d)
    B_shape = (r + 1 if case["shapes"] == "bad-r" else r, d)
    scale = 1 / math.sqrt(max(d, 1))
    A = _values(A_shape, pdtype, kinds["A"], gen) * scale
    B = _values(B_shape, pdtype, "normal", gen) * scale
    b = _values(() if case["shapes"] == "bias-0d" else (r,), pdtype, kinds["b"], gen)
    tensors = [h.to(dtype)] + [t.to(pdtype) for t in (A, B, b)]
    if case["layout"] == "sparse" and tensors[0].dim() >= 1:
        tensors[0] = tensors[0].to_sparse()
    h_grad, p_grad = case["grads"]
    floating = [t.dtype in FLOATS and t.layout == torch.strided for t in tensors]
    if h_grad and floating[0]:
        tensors[0].requires_grad_()
    for i in (1, 2, 3):
        if p_grad and floating[i]:
            tensors[i].requires_grad_()
    valid = (
        dtype in FLOATS
        and pdtype in (dtype, torch.float32)
        and not case["zero_d_h"]
        and r >= 1
        and case["shapes"] == "ok"
        and case["layout"] != "sparse"
    )
    return tensors, valid


@given(edit_cases())
def test_public_edits(case):
    note(repr(case))
    fn, truth_fn, composite, names = OPS[case["op"]]
    tensors, valid = _build(case)
    h, A, B, b = tensors
    try:
        out = fn(h, A, B, b)
    except (TypeError, ValueError, RuntimeError) as error:
        assert not valid, f"a valid case raised: {error!r}"
        assert_clear_error(error, ("h", *names, "b"), "public ops")
        return
    assert valid, "an invalid case ran"
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    truth = truth_fn(*leaves)
    # torch's own composite, computed in the accumulation dtype as the fused op is
    like_leaves = [t.detach().to(acc).requires_grad_() for t in tensors]
    like = composite(*like_leaves)
    assert_right(out, truth.detach(), like.detach().to(h.dtype))
    wanted = [i for i, t in enumerate(tensors) if t.requires_grad]
    if wanted and case["values"] == "normal":
        gen = torch.Generator().manual_seed(case["seed"])
        g = torch.randn(out.shape, dtype=torch.float64, generator=gen).to(out.dtype)
        grads = torch.autograd.grad(out, [tensors[i] for i in wanted], g)
        truths = torch.autograd.grad(truth, [leaves[i] for i in wanted], g.double())
        likes = torch.autograd.grad(like, [like_leaves[i] for i in wanted], g.to(acc))
        for i, got, want, ref in zip(wanted, grads, truths, likes, strict=True):
            assert got.dtype == tensors[i].dtype and got.shape == tensors[i].shape
            assert_right(got, want, ref.to(got.dtype))
    record("public ops", RIGHT)


# ---- raw ops, in a child process --------------------------------------------------------------

CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import reft_ext  # registers the ops
from truth import truth_lowrank_edit
specs = json.loads(sys.stdin.read())
for i, s in enumerate(specs):
    print(json.dumps({"start": i}), flush=True)
    gen = torch.Generator().manual_seed(s["seed"])
    dt = getattr(torch, s["dtype"]); acc = getattr(torch, s["acc"])
    N, d, r = s["N"], s["d"], s["r"]
    def make(shape, dtype, device="cpu"):
        t = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
        return t.to(device) if device == "meta" else t
    h = make((N, d), dt, s["devices"].get("h", "cpu"))
    P = make((r, s["Pd"]), acc, s["devices"].get("P", "cpu"))
    Q = make((r, d), acc, s["devices"].get("Q", "cpu"))
    b = make((s["br"],), acc, s["devices"].get("b", "cpu"))
    if s["noncontig"] and h.dim() == 2 and h.numel():
        h = h.T.contiguous().T
    try:
        if s["op"] == "forward":
            out, z = torch.ops.reft_ext.lowrank_edit_forward(h, P, Q, b)
            t = truth_lowrank_edit(h.double(), P.double(), Q.double(), b.double())
            scale = max(t.abs().max().item(), 1.0) if t.numel() else 1.0
            err = (out.double() - t).abs().max().item() / scale if t.numel() else 0.0
        else:
            g = make((N, d), dt, s["devices"].get("g", "cpu"))
            z = make((N, s["zr"]), acc, s["devices"].get("z", "cpu"))
            grads = torch.ops.reft_ext.lowrank_edit_backward(g, h, P, Q, z, s["mask"])
            # truth of the backward: z is an input (the forward's projection), as in the kernel
            hd, Pd, Qd, gd, zd = (x.double() for x in (h, P, Q, g, z))
            gz = gd @ Qd.T
            want = [gd + gz @ Pd, gz.T @ hd, zd.T @ gd, gz.sum(0)]
            err = 0.0
            for got, w, m in zip(grads, want, s["mask"]):
                if not m:
                    assert got.numel() == 0, "a skipped gradient was computed"
                    continue
                scale = max(w.abs().max().item(), 1.0) if w.numel() else 1.0
                err = max(err, (got.double() - w).abs().max().item() / scale if w.numel() else 0.0)
        print(json.dumps({"i": i, "ok": True, "err": err}), flush=True)
    except (RuntimeError, ValueError, TypeError) as e:
        report = {"i": i, "ok": False, "type": type(e).__name__, "message": str(e)[:300]}
        print(json.dumps(report), flush=True)
"""


BAD_RAW = ["dtype", "acc", "r0", "Pd", "br", "zr", "meta-P", "meta-z", "meta-h", "noncontig"]


@st.composite
def raw_cases(draw):
    # About half the cases are valid; the others have one thing wrong.
    bad = draw(st.sampled_from(["none"] * 8 + BAD_RAW))
    dtype = draw(st.sampled_from(["float64", "float32", "bfloat16", "float16"]))
    if bad == "dtype":
        dtype = "int32"
    acc = "float64" if dtype == "float64" else "float32"
    if bad == "acc":
        acc = draw(st.sampled_from(["float16", "float64" if acc == "float32" else "float32"]))
    d = draw(st.sampled_from([0, 1, 3, 17, 64]))
    r = 0 if bad == "r0" else draw(st.sampled_from([1, 2, 7]))
    devices = {"meta-P": {"P": "meta"}, "meta-z": {"z": "meta"}, "meta-h": {"h": "meta"}}
    return {
        "op": draw(st.sampled_from(["forward", "backward"])),
        "dtype": dtype,
        "acc": acc,
        "N": draw(st.sampled_from([0, 1, 5, 33])),
        "d": d,
        "r": r,
        "Pd": d + 1 if bad == "Pd" else d,
        "br": r + 1 if bad == "br" else r,
        "zr": r + 1 if bad == "zr" else r,
        "devices": devices.get(bad, {}),
        "noncontig": bad == "noncontig",
        "mask": draw(st.lists(st.booleans(), min_size=4, max_size=4)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _raw_valid(s) -> bool:
    expected_acc = "float64" if s["dtype"] == "float64" else "float32"
    used = ("h", "P", "Q", "b") if s["op"] == "forward" else ("h", "P", "Q", "z", "g")
    return (
        s["dtype"] != "int32"
        and s["acc"] == expected_acc
        and s["r"] >= 1
        and s["Pd"] == s["d"]
        and (s["br"] == s["r"] if s["op"] == "forward" else s["zr"] == s["r"])
        and not set(s["devices"]) & set(used)
        and not (s["noncontig"] and s["N"] > 1 and s["d"] > 1)
    )


RAW_TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}


# No shrinking: every shrink step would start a child process; the failing case is named instead.
@settings(max_examples=max(2, EXAMPLES // 100), phases=[Phase.generate])
@given(st.lists(raw_cases(), min_size=150, max_size=150))
def test_raw_ops_in_a_child_process(specs):
    """150 raw-op cases per example, run by one child process."""
    tests_dir = str(Path(__file__).resolve().parents[1])
    run = subprocess.run(
        [sys.executable, "-c", CHILD, tests_dir],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    started = [line["start"] for line in lines if "start" in line]
    assert run.returncode == 0, (
        f"the child died (status {run.returncode}) in case "
        f"{specs[started[-1]] if started else None}: {run.stderr[-2000:]}"
    )
    results = [line for line in lines if "i" in line]
    assert len(results) == len(specs)
    for result in results:
        spec = specs[result["i"]]
        if result["ok"]:
            assert _raw_valid(spec), f"an invalid raw case ran: {spec}"
            assert result["err"] <= RAW_TOL[spec["dtype"]], (spec, result)
            record("raw ops (child process)", RIGHT)
        else:
            assert not _raw_valid(spec), f"a valid raw case raised: {spec}: {result}"
            error = {"RuntimeError": RuntimeError, "ValueError": ValueError}.get(
                result["type"], TypeError
            )(result["message"])
            assert_clear_error(
                error, ("h", "P", "Q", "b", "z", "grad_out"), "raw ops (child process)"
            )
