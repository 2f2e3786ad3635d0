"""The multi-adapter suites: the ``lowrank_edit_multi`` op against the ways to do without it.

``multi-op`` (:class:`MultiOpCase`): h (N, d) whose rows are spread at random over A adapters of
rank r (float32 factors), forward (serving) or forward+backward (training several adapters in one
batch). Providers: ``fused`` (reft_ext.lowrank_edit_multi), ``loop`` (split the batch by adapter,
the single-adapter op per group, scatter back: what a user writes without the op),
``gather_einsum`` (gather each row's factors, then einsum: reft_ext.reference.lowrank_edit_multi,
the composite that moves r times the bytes of h) and ``single`` (reft_ext.lowrank_edit with one
adapter on the same rows: the physical limit, one pass over h).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import reference
from ..functional import lowrank_edit, lowrank_edit_multi
from .record import Case
from .table import Column, ratio

MULTI_PROVIDERS = ("fused", "loop", "gather_einsum", "single")


@dataclass(frozen=True)
class MultiOpCase(Case):
    """lowrank_edit_multi in ``mode`` on h (N, d) of ``dtype``, rows over A adapters of rank r."""

    suite: ClassVar[str] = "multi-op"
    title: ClassVar[str] = (
        "Multi-adapter edit: fused vs per-adapter loop and gather-einsum, single-adapter limit"
    )
    columns: ClassVar[tuple[Column, ...]] = (
        ratio("gather_einsum", "fused"),
        ratio("loop", "fused"),
        ratio("fused", "single"),
    )

    mode: str
    N: int
    d: int
    r: int
    A: int
    dtype: str

    @classmethod
    def grid(cls, quick: bool) -> list[MultiOpCase]:
        """N=4096, d=2048, r=8: quick, A=64 forward in float32; else A ∈ {1, 8, 64, 256},
        float32 and bfloat16, forward, and forward+backward at A ∈ {8, 64} in float32."""
        if quick:
            return [cls("forward", 4096, 2048, 8, 64, "float32")]
        forward = [
            cls("forward", 4096, 2048, 8, A, dtype)
            for dtype, A in itertools.product(("float32", "bfloat16"), (1, 8, 64, 256))
        ]
        training = [cls("forward_backward", 4096, 2048, 8, A, "float32") for A in (8, 64)]
        return forward + training

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        inputs = MultiInputs.random(self, device)
        return {p: multi_call(self, p, inputs) for p in MULTI_PROVIDERS}


@dataclass
class MultiInputs:
    """h (N, d), the A adapters' float32 P, Q (A, r, d) and b (A, r), each row's adapter (N,)
    drawn uniformly, and an upstream gradient."""

    h: torch.Tensor
    P: torch.Tensor
    Q: torch.Tensor
    b: torch.Tensor
    adapter: torch.Tensor
    grad_out: torch.Tensor

    @classmethod
    def random(cls, case: MultiOpCase, device: torch.device) -> MultiInputs:
        train = case.mode == "forward_backward"
        h = torch.randn(case.N, case.d, device=device, dtype=getattr(torch, case.dtype))
        scale = case.d**-0.5
        P, Q = (torch.randn(case.A, case.r, case.d, device=device) * scale for _ in range(2))
        b = torch.randn(case.A, case.r, device=device)
        for t in (h, P, Q, b):
            t.requires_grad_(train)
        adapter = torch.randint(0, case.A, (case.N,), device=device)
        return cls(h, P, Q, b, adapter, torch.randn_like(h))


def per_adapter_loop(
    h: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor, adapter: torch.Tensor
) -> torch.Tensor:
    """The batch split by adapter, one lowrank_edit per adapter present, rows scattered back
    (-1 rows copied): the loop a user writes without the multi-adapter op."""
    order = torch.argsort(adapter, stable=True)
    counts = torch.bincount(adapter + 1, minlength=P.shape[0] + 1).tolist()
    out = h.clone()
    start = counts[0]  # the -1 rows sort first and stay copied
    for a, count in enumerate(counts[1:]):
        if count:
            rows = order[start : start + count]
            out = out.index_copy(0, rows, lowrank_edit(h[rows], P[a], Q[a], b[a]))
            start += count
    return out


_FORWARDS = {
    "fused": lowrank_edit_multi,
    "loop": per_adapter_loop,
    "gather_einsum": reference.lowrank_edit_multi,
    "single": lambda h, P, Q, b, adapter: lowrank_edit(h, P[0], Q[0], b[0]),
}


def multi_call(case: MultiOpCase, provider: str, x: MultiInputs) -> Callable[[], object]:
    """A zero-argument callable: ``provider``'s forward (under no_grad), or its forward and the
    gradients of h, P, Q and b."""
    forward = _FORWARDS[provider]
    args = (x.h, x.P, x.Q, x.b, x.adapter)
    if case.mode == "forward":

        def run_forward():
            with torch.no_grad():
                return forward(*args)

        return run_forward

    def run_training():
        return torch.autograd.grad(forward(*args), (x.h, x.P, x.Q, x.b), x.grad_out)

    return run_training


#: The multi-generate suite's batch: prompts of PROMPT_TOKENS tokens spread evenly over ADAPTERS
#: adapters, NEW_TOKENS greedy tokens each.
PROMPTS, ADAPTERS, PROMPT_TOKENS, NEW_TOKENS = 32, 8, 32, 16


def _tokens_per_second(provider: str) -> Column:
    """Generated tokens per second of ``provider``: every prompt's new tokens over its median."""
    return Column(
        f"{provider} tokens/s",
        (provider,),
        lambda m: PROMPTS * NEW_TOKENS / m[provider],
        "{:.0f}".format,
    )


@dataclass(frozen=True)
class MultiGenerateCase(Case):
    """Greedy generation for PROMPTS prompts spread over ADAPTERS LoReFT adapters (rank 4,
    ``f1+l1``, at 4 blocks) on a random Llama.

    Providers: ``mixed`` (one ``generate`` of the whole batch with ``adapter_names``),
    ``per_adapter`` (one ``generate`` per adapter on its prompts, after ``set_adapter``) and
    ``base`` (the whole batch with the adapters disabled: the base model's own cost).
    """

    suite: ClassVar[str] = "multi-generate"
    title: ClassVar[str] = (
        f"Mixed-adapter generation: {PROMPTS} prompts of {PROMPT_TOKENS} tokens over {ADAPTERS} "
        f"adapters, {NEW_TOKENS} new tokens each; one mixed batch vs one batch per adapter"
    )
    columns: ClassVar[tuple[Column, ...]] = (
        _tokens_per_second("mixed"),
        _tokens_per_second("per_adapter"),
        ratio("per_adapter", "mixed"),
        ratio("mixed", "base"),
    )

    model: str

    @classmethod
    def grid(cls, quick: bool) -> list[MultiGenerateCase]:
        """The tiny Llama, and (not quick) the SmolLM2-135M-shaped one."""
        return [cls("tiny")] if quick else [cls("tiny"), cls("smollm2")]

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        return multi_generate_calls(self, device)


def multi_generate_calls(case: MultiGenerateCase, device: torch.device) -> dict:
    """The two providers on one ReftModel holding ADAPTERS adapters (pyreft's random
    initialisation: non-zero edits) and one batch of random prompts."""
    from ..hf import ReftConfig, get_reft_model
    from .models import random_llama

    model = random_llama(case.model, device)
    blocks = model.config.num_hidden_layers
    config = ReftConfig(layers=[blocks // 5, 2 * blocks // 5, 3 * blocks // 5, 4 * blocks // 5])
    names = [f"adapter{i}" for i in range(ADAPTERS)]
    reft = get_reft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        reft.add_adapter(name, config)
    reft.eval()
    ids = torch.randint(1, model.config.vocab_size, (PROMPTS, PROMPT_TOKENS), device=device)
    mask = torch.ones_like(ids)
    row_adapter = [names[i % ADAPTERS] for i in range(PROMPTS)]
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    def mixed():
        with torch.no_grad():
            return reft.generate(input_ids=ids, attention_mask=mask, adapter_names=row_adapter,
                                 **options)  # fmt: skip

    def per_adapter():
        outputs = []
        with torch.no_grad():
            for a, name in enumerate(names):
                rows = slice(a, None, ADAPTERS)  # this adapter's prompts
                reft.set_adapter(name)
                outputs.append(
                    reft.generate(input_ids=ids[rows], attention_mask=mask[rows], **options)
                )
        return outputs

    def base():
        with torch.no_grad(), reft.disable_adapter():
            return reft.generate(input_ids=ids, attention_mask=mask, **options)

    return {"mixed": mixed, "per_adapter": per_adapter, "base": base}
