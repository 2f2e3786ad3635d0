"""Benchmark cases and providers, shared by ``python -m reft_ext.bench`` and ``bench/*.py``.

A case is one shape, dtype and mode (``forward`` or ``forward_backward``) of the LoReFT op.
Providers: ``fused`` (reft_ext.loreft), ``naive`` (reft_ext.reference.loreft, pyreft's
composite) and ``copy`` (``out.copy_(h)``, the memory roofline of a pass that reads h and writes
an output).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .. import reference
from ..functional import loreft

MODES = ("forward", "forward_backward")
PROVIDERS: dict[str, Callable[..., torch.Tensor]] = {"fused": loreft, "naive": reference.loreft}


@dataclass(frozen=True)
class OpCase:
    """One benchmark point: h (N, d) of ``dtype``, rank r, in ``mode``."""

    N: int
    d: int
    r: int
    dtype: str
    mode: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def name(self) -> str:
        return f"{self.mode}-N{self.N}-d{self.d}-r{self.r}-{self.dtype}"

    def as_dict(self) -> dict:
        return asdict(self)


def op_cases(quick: bool) -> list[OpCase]:
    """The grid: quick = the headline shape (N=8192, d=2048, r=4) and one small-N shape."""
    if quick:
        shapes = [(8192, 2048, 4), (256, 2048, 4)]
        dtypes = ["float32", "bfloat16"]
    else:
        shapes = list(itertools.product((256, 8192), (768, 2048, 4096), (4, 16)))
        dtypes = ["float32", "bfloat16"]
    return [
        OpCase(N, d, r, dtype, mode)
        for (N, d, r), dtype, mode in itertools.product(shapes, dtypes, MODES)
    ]


@dataclass
class OpInputs:
    """Inputs of one case: hidden states, LoReFT parameters (float32) and an upstream gradient."""

    h: torch.Tensor
    R: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    grad_out: torch.Tensor
    copy_target: torch.Tensor


def make_inputs(case: OpCase, device: torch.device, sets: int = 1) -> list[OpInputs]:
    """``sets`` independent input sets (rotate through them when they fit in cache)."""
    result = []
    for _ in range(sets):
        h = torch.randn(case.N, case.d, device=device, dtype=case.torch_dtype)
        R = torch.linalg.qr(torch.randn(case.d, case.r, device=device))[0].T.contiguous()
        W = torch.randn(case.r, case.d, device=device) / case.d**0.5
        b = torch.randn(case.r, device=device)
        h.requires_grad_(case.mode == "forward_backward")
        for p in (R, W, b):
            p.requires_grad_(case.mode == "forward_backward")
        result.append(OpInputs(h, R, W, b, torch.randn_like(h), torch.empty_like(h)))
    return result


def input_sets_for(case: OpCase, cache_bytes: int = 64 << 20) -> int:
    """Rotate 4 input sets when one set's rows fit in ``cache_bytes``, else use one."""
    return 4 if case.N * case.d * torch.finfo(case.torch_dtype).bits // 8 * 3 <= cache_bytes else 1


def provider_call(case: OpCase, provider: str, inputs: list[OpInputs]) -> Callable[[], object]:
    """A zero-argument callable running ``provider`` on the next input set each call."""
    counter = itertools.count()

    if provider == "copy":

        def run_copy():
            x = inputs[next(counter) % len(inputs)]
            return x.copy_target.copy_(x.h.detach())

        return run_copy

    fn = PROVIDERS[provider]

    def run():
        x = inputs[next(counter) % len(inputs)]
        if case.mode == "forward":
            with torch.no_grad():
                return fn(x.h, x.R, x.W, x.b)
        out = fn(x.h, x.R, x.W, x.b)
        return torch.autograd.grad(out, (x.h, x.R, x.W, x.b), x.grad_out)

    return run
