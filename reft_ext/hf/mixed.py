"""Mixed-adapter batches: each row's adapter, its positions, and one fused edit per block.

Every hooked block edits all the selected (row, token) pairs of a mixed batch in one call of
:func:`reft_ext.lowrank_edit_multi`: the factors of the interventions at that block (one per
adapter present in the batch and position group) are stacked into (A, r, d), and each pair gets
the index of its intervention.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..dtypes import accumulation_dtype
from ..functional import lowrank_edit_multi
from .adapters import BASE_ADAPTER, AdapterSpec, decode_group
from .config import intervention_key
from .edit import edit_selected_, selected
from .locations import default_locations


@dataclass(frozen=True)
class MixedEdits:
    """The edits of one block in a mixed batch.

    index: LongTensor (B, P), the token positions of each row, −1 for none; slot: LongTensor
    (B, P), the intervention of each position, an index into ``keys``; keys: the interventions,
    ``(adapter name, intervention_key)`` each.
    """

    index: torch.Tensor
    slot: torch.Tensor
    keys: tuple[tuple[str, str], ...]

    def repeat_rows(self, repeats: int) -> MixedEdits:
        """The edits of a batch whose rows ``generate`` repeated ``repeats`` times each
        (``repeat_interleave``: beams, several return sequences): every copy keeps its row's."""
        index, slot = (t.repeat_interleave(repeats, dim=0) for t in (self.index, self.slot))
        return MixedEdits(index, slot, self.keys)


def check_adapter_names(adapter_names, known: Collection[str], batch: int) -> list[str]:
    """``adapter_names`` as a list if it gives one known adapter name (or ``"__base__"``) per
    row of a batch of ``batch``; else TypeError/ValueError naming it."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            f"adapter_names must be a list of str (one adapter name per row), got "
            f"{type(adapter_names).__name__}"
        )
    if len(adapter_names) != batch:
        raise ValueError(
            f"adapter_names has {len(adapter_names)} names, the batch has {batch} rows: give one "
            f"name per row ({BASE_ADAPTER!r} for no adapter)"
        )
    for row, name in enumerate(adapter_names):
        if name != BASE_ADAPTER and (not isinstance(name, str) or name not in known):
            raise ValueError(
                f"adapter_names[{row}] = {name!r} was never added (adapters: {list(known)}, and "
                f"{BASE_ADAPTER!r} for no adapter)"
            )
    return list(adapter_names)


class _Placed(NamedTuple):
    """One adapter present in a mixed batch: its rows (B,) bool, its blocks, its position groups
    and their widths, and its positions (B, P), the groups side by side (−1 for none)."""

    adapter: str
    rows: torch.Tensor
    layers: tuple[int, ...]
    groups: tuple[str, ...]
    widths: list[int]
    index: torch.Tensor


def _pack(batch: int, placed: list[_Placed], layer: int) -> MixedEdits:
    """The edits of block ``layer`` by the ``placed`` adapters that edit it: a row's columns are
    its adapter's positions, padded with −1 to the widest adapter's."""
    width = max(p.index.shape[1] for p in placed)
    index = placed[0].index.new_full((batch, width), -1)
    slot = torch.zeros_like(index)
    keys: list[tuple[str, str]] = []
    for p in placed:
        first = len(keys)  # the slots of its groups follow those of the adapters before it
        slots = torch.arange(first, first + len(p.groups), device=index.device)
        widths = torch.tensor(p.widths, device=index.device)
        index[p.rows, : p.index.shape[1]] = p.index[p.rows]
        slot[p.rows, : p.index.shape[1]] = slots.repeat_interleave(widths)
        keys += [(p.adapter, intervention_key(layer, group)) for group in p.groups]
    return MixedEdits(index, slot, tuple(keys))


def _by_layer(
    names: list[str],
    specs: dict[str, AdapterSpec],
    positions_of: Callable[[AdapterSpec], dict[str, torch.Tensor]],
) -> dict[int, MixedEdits]:
    """{layer: MixedEdits} over the adapters present in ``names``, stacked in the order they were
    added (so a block's stack does not depend on the order of the rows); ``positions_of(spec)``
    gives an adapter's {group: (B, P_g)} positions."""
    present = set(names)
    placed = []
    for adapter, spec in specs.items():
        if adapter in present:
            positions = positions_of(spec)
            index = torch.cat(list(positions.values()), dim=1)
            rows = torch.tensor([name == adapter for name in names], device=index.device)
            widths = [p.shape[1] for p in positions.values()]
            placed.append(_Placed(adapter, rows, spec.layers, tuple(positions), widths, index))
    layers = sorted({layer for p in placed for layer in p.layers})
    return {
        layer: _pack(len(names), [p for p in placed if layer in p.layers], layer)
        for layer in layers
    }


def prompt_edits(
    names: list[str],
    specs: dict[str, AdapterSpec],
    attention_mask: torch.Tensor | None,
    length: int,
    device: torch.device,
) -> dict[int, MixedEdits]:
    """The edits of a mixed batch's full pass: each row at its adapter's positions (from its
    positions string and the row's real tokens), {layer: MixedEdits}; ``"__base__"`` rows none."""
    batch = len(names)
    return _by_layer(
        names,
        specs,
        lambda spec: default_locations(
            spec.positions, spec.groups, attention_mask, batch, length, device
        ),
    )


def decode_edits(
    names: list[str], specs: dict[str, AdapterSpec], device: torch.device
) -> dict[int, MixedEdits]:
    """The edits of each single-token decode pass of ``generate(intervene_on="all")``: the new
    token (index 0 with a KV cache) of each row, by its adapter's ``last`` (or only) group."""
    index = torch.zeros(len(names), 1, dtype=torch.long, device=device)
    return _by_layer(names, specs, lambda spec: {decode_group(spec.groups): index})


def stacked_factors(
    interventions: Sequence[nn.Module], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, Q (A, r, d), b (A, r)) in ``dtype`` of A interventions, stacked in order.

    Interventions of rank below the largest, r, are padded with zero rows of P, Q and b: a zero
    row adds (0·h + 0)·0 = 0 to the edit, so each keeps its own result. Differentiable (stack and
    pad), so every intervention's parameters get their gradients.
    """
    rank = max(module.rank for module in interventions)
    stacks: tuple[list, list, list] = ([], [], [])
    for module in interventions:
        pad = rank - module.rank
        P, Q, b = module.factors(dtype)
        stacks[0].append(F.pad(P, (0, 0, 0, pad)))
        stacks[1].append(F.pad(Q, (0, 0, 0, pad)))
        stacks[2].append(F.pad(b, (0, pad)))
    return tuple(torch.stack(parts) for parts in stacks)


def edit_mixed_(hidden: torch.Tensor, edits: MixedEdits, interventions: list[nn.Module]) -> None:
    """Edit ``hidden`` (B, T, d) in place at ``edits``' positions, each by its intervention
    (``interventions[i]`` is ``edits.keys[i]``'s module), in one ``lowrank_edit_multi`` call."""
    for (adapter, key), module in zip(edits.keys, interventions, strict=True):
        if module.training and module.dropout > 0:
            # The fused multi-adapter edit has no dropout; applying it per adapter would split
            # the block's one call into one per adapter.
            raise ValueError(
                f"adapter_names: adapter {adapter!r} ({key}) has dropout {module.dropout} and is "
                "in training mode; mixed batches apply no dropout: call eval(), or train it alone"
            )
    rows, cols, tokens = selected(edits.index.to(hidden.device))
    if not rows.numel():
        return
    slots = edits.slot.to(hidden.device)[rows, cols]
    acc = accumulation_dtype(hidden.dtype)

    def edit(x: torch.Tensor) -> torch.Tensor:
        return lowrank_edit_multi(x, *stacked_factors(interventions, acc), slots)

    params = [p for module in interventions for p in module.parameters()]
    edit_selected_(hidden, rows, tokens, edit, params)
