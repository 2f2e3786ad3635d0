"""The activated-edit suite (``act``): LoReFT with pyreft's ``act_fn``,
h + (act(h Wᵀ + b) − h Rᵀ) R, in ``mode`` on h (N, d).

Providers: ``fused`` (reft_ext.lowrank_edit_act: one pass over h for the 2r projections, the
activation and the edit), ``naive`` (reft_ext.reference.lowrank_edit_act: pyreft's forward as
torch ops in h's dtype) and ``plain`` (reft_ext.loreft, the edit without an activation: what the
activation adds over the fused identity).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import reference
from ..functional import loreft, lowrank_edit_act
from .record import Case
from .table import Column, ratio

ACT_PROVIDERS = ("fused", "naive", "plain")


@dataclass(frozen=True)
class ActCase(Case):
    """LoReFT with ``activation`` on h (N, d) of ``dtype``, rank r, float32 parameters."""

    suite: ClassVar[str] = "act"
    title: ClassVar[str] = "Activated LoReFT (pyreft's act_fn): fused vs naive, plain edit"
    columns: ClassVar[tuple[Column, ...]] = (ratio("naive", "fused"), ratio("fused", "plain"))

    mode: str
    N: int
    d: int
    r: int
    dtype: str
    activation: str

    @classmethod
    def grid(cls, quick: bool) -> list[ActCase]:
        """N=8192, d=2048, r=4, GELU: quick, float32 forward+backward; else float32 and bfloat16,
        forward and forward+backward."""
        if quick:
            return [cls("forward_backward", 8192, 2048, 4, "float32", "gelu")]
        dtypes, modes = ("float32", "bfloat16"), ("forward", "forward_backward")
        return [
            cls(mode, 8192, 2048, 4, dtype, "gelu")
            for dtype, mode in itertools.product(dtypes, modes)
        ]

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        train = self.mode == "forward_backward"
        h = torch.randn(self.N, self.d, device=device, dtype=getattr(torch, self.dtype))
        R = torch.linalg.qr(torch.randn(self.d, self.r, device=device))[0].T.contiguous()
        W = torch.randn(self.r, self.d, device=device) / self.d**0.5
        b = torch.randn(self.r, device=device)
        leaves = (h, R, W, b)
        for t in leaves:
            t.requires_grad_(train)
        grad_out = torch.randn_like(h)
        forwards = {
            "fused": lambda h, R, W, b: lowrank_edit_act(h, W, b, R, self.activation, R),
            "naive": lambda h, R, W, b: reference.lowrank_edit_act(h, W, b, R, self.activation, R),
            "plain": loreft,
        }

        def call(forward):
            if not train:

                def run_forward():
                    with torch.no_grad():
                        return forward(*leaves)

                return run_forward
            return lambda: torch.autograd.grad(forward(*leaves), leaves, grad_out)

        return {p: call(forwards[p]) for p in ACT_PROVIDERS}
