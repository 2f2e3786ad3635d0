"""Token positions to edit: from a positions string and the attention mask, or given explicitly."""

from __future__ import annotations

import torch

from .config import Positions


def default_locations(
    positions: Positions,
    groups: tuple[str, ...],
    attention_mask: torch.Tensor | None,
    batch: int,
    length: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Per position group, a LongTensor (B, P) of token indices, −1 where there is no token.

    Real tokens are those where ``attention_mask`` (B, T) of 0s and 1s, as :func:`checked_mask`
    accepts it, is 1 (all, without a mask); they must be contiguous (left or right padding), else
    ValueError. ``first`` takes
    the first p real tokens, ``last`` the last s. A sequence with fewer than p + s real tokens
    gets its first min(p, n) tokens in ``first`` and the remaining last tokens, at most s, in
    ``last``: no token is edited twice and no padding is edited; missing slots are −1.
    ``shared`` (share_weights) is ``first`` and ``last`` together; ``all`` is every real token.
    """
    if attention_mask is None:
        starts = torch.zeros(batch, dtype=torch.long, device=device)
        counts = torch.full((batch,), length, dtype=torch.long, device=device)
    else:
        mask = attention_mask.to(device=device, dtype=torch.long)
        counts = mask.sum(dim=1)
        starts = torch.where(counts > 0, mask.argmax(dim=1), torch.zeros_like(counts))
        ends = length - mask.flip(1).argmax(dim=1)  # one past each row's last real token
        holes = (counts > 0) & (ends - starts != counts)
        if bool(holes.any()):
            row = int(holes.nonzero()[0, 0])
            raise ValueError(
                f"attention_mask row {row} has padding between real tokens "
                f"({attention_mask[row].tolist()}): the positions string needs left or right "
                "padding only; pass intervention_locations for other layouts"
            )
    if positions.all_tokens:
        offsets = torch.arange(length, device=device).expand(batch, -1)
        return {"all": _place(starts, offsets, offsets < counts[:, None])}
    first_n = counts.clamp(max=positions.first)
    last_n = (counts - first_n).clamp(max=positions.last)
    first_offsets = torch.arange(positions.first, device=device).expand(batch, -1)
    last_offsets = torch.arange(positions.last, device=device).expand(batch, -1)
    first = _place(starts, first_offsets, first_offsets < first_n[:, None])
    last_start = starts + counts - last_n
    last = _place(last_start, last_offsets, last_offsets < last_n[:, None])
    by_group = {"first": first, "last": last, "shared": torch.cat([first, last], dim=1)}
    return {group: by_group[group] for group in groups}


def checked_mask(attention_mask, batch: int, length: int, explicit: bool = False) -> torch.Tensor:
    """``attention_mask`` if it fits inputs of ``batch`` rows and ``length`` tokens; else
    TypeError/ValueError naming it.

    For the positions rules (``explicit=False``) it must be (batch, length) of 0s and 1s. With
    explicit locations the mask is not read here: any 2-D (batch, L) with L >= length fits (a
    decode step's mask also covers the cached tokens).
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    shape = tuple(attention_mask.shape)
    if explicit:
        if len(shape) != 2 or shape[0] != batch or shape[1] < length:
            raise ValueError(
                f"attention_mask must have shape (batch, L) = ({batch}, L >= {length}) for these "
                f"inputs, got {shape}"
            )
        return attention_mask
    if shape != (batch, length):
        raise ValueError(
            f"attention_mask must have shape (batch, length) = ({batch}, {length}) like the "
            f"inputs (a 2-D mask of 0s and 1s), got {shape}; a decode step with a cache needs "
            "explicit intervention_locations"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    return attention_mask


def _place(starts: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, starts[:, None] + offsets, torch.full_like(offsets, -1))


def explicit_locations(
    locations, groups: tuple[str, ...], layers: list[int], batch: int, length: int
) -> dict[int, dict[str, torch.Tensor]]:
    """Validate user locations: a LongTensor (B, P), or (G, B, P) for G groups, or a dict
    {layer: tensor}; returns {layer: {group: (B, P)}}. Indices must be in [−1, T), each at most
    once in a row of a group (−1 may repeat)."""
    per_layer = locations if isinstance(locations, dict) else dict.fromkeys(layers, locations)
    unknown = set(per_layer) - set(layers)
    if unknown:
        raise ValueError(f"intervention_locations names layers without interventions: {unknown}")
    result = {}
    for layer, value in per_layer.items():
        value = torch.as_tensor(value)
        if value.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"intervention_locations must be integer, got {value.dtype}")
        if value.dim() == 2 and len(groups) == 1:
            value = value.unsqueeze(0)
        if value.dim() != 3 or value.shape[0] != len(groups) or value.shape[1] != batch:
            raise ValueError(
                f"intervention_locations for layer {layer} must be (B, P) = ({batch}, P) with one "
                f"position group, or (G, B, P) with G = {len(groups)} groups {groups}; got "
                f"{tuple(value.shape)}"
            )
        if value.numel() and (int(value.min()) < -1 or int(value.max()) >= length):
            raise ValueError(f"intervention_locations must lie in [-1, {length}), layer {layer}")
        ordered = value.sort(dim=-1).values
        repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        if bool(repeated.any()):
            group, row, _ = (int(i) for i in repeated.nonzero()[0])
            raise ValueError(
                f"intervention_locations repeat a position in row {row} of group "
                f"{groups[group]!r}, layer {layer} ({value[group, row].tolist()}): each position "
                "is edited once; use -1 for unused slots"
            )
        result[layer] = {g: value[i].long() for i, g in enumerate(groups)}
    return result
