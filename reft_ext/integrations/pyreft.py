"""pyreft interop: load checkpoints written by pyreft's ``ReftModel.save`` into reft_ext.

A pyreft checkpoint directory holds ``config.json`` (pyvene's config: ``representations``,
``intervention_types``, ``sorted_keys``) and one ``intkey_<key>.bin`` per intervention (a torch
pickle of its state dict). For LoReFT the state dict has ``weight`` (r, d) and ``bias`` (r,) of the
learned source and ``rotate_layer`` (d, r) with orthonormal columns, so R = rotate_layer.T.
Reading needs neither pyreft nor pyvene.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..hf import ReftConfig, ReftModel, get_reft_model
from ..hf.blocks import hidden_size

# pyvene's RepresentationConfig fields, in the order config.json lists them.
_LAYER, _COMPONENT, _UNIT, _MAX_UNITS, _RANK = range(5)
_SUPPORTED_TYPES = {"LoreftIntervention"}
_SUPPORTED_COMPONENTS = {"block_output"}


@dataclass
class PyreftIntervention:
    """One intervention of a pyreft checkpoint: where it sits and its state dict."""

    key: str
    layer: int
    component: str
    rank: int
    type_name: str
    state: dict[str, torch.Tensor]


def read_pyreft_checkpoint(directory: str | Path) -> list[PyreftIntervention]:
    """The interventions of a pyreft checkpoint, in ``sorted_keys`` order.

    Raises:
        FileNotFoundError: a file is missing. ValueError: an intervention type or component that
        reft_ext cannot represent (supported: LoreftIntervention at block_output).
    """
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    keys = config["sorted_keys"]
    representations = config["representations"]
    types = config["intervention_types"]
    if not len(keys) == len(representations) == len(types):
        raise ValueError(
            f"{directory}/config.json: sorted_keys, representations and intervention_types differ "
            "in length"
        )
    result = []
    for key, representation, type_text in zip(keys, representations, types, strict=True):
        type_name = type_text.rsplit(".", 1)[-1].strip("'>")
        if type_name not in _SUPPORTED_TYPES:
            raise ValueError(
                f"pyreft intervention {key!r} has type {type_name!r}; reft_ext imports "
                f"{sorted(_SUPPORTED_TYPES)}"
            )
        component = representation[_COMPONENT]
        if component not in _SUPPORTED_COMPONENTS:
            raise ValueError(
                f"pyreft intervention {key!r} sits at component {component!r}; reft_ext supports "
                f"{sorted(_SUPPORTED_COMPONENTS)}"
            )
        state = torch.load(directory / f"intkey_{key}.bin", map_location="cpu", weights_only=True)
        missing = {"weight", "bias", "rotate_layer"} - set(state)
        if missing:
            raise ValueError(f"intkey_{key}.bin lacks LoReFT weights {sorted(missing)}")
        result.append(
            PyreftIntervention(
                key,
                int(representation[_LAYER]),
                component,
                int(representation[_RANK]),
                type_name,
                state,
            )
        )
    return result


def load_pyreft_checkpoint(
    model: nn.Module, directory: str | Path, positions: str = "f1+l1"
) -> ReftModel:
    """Attach the LoReFT interventions of a pyreft checkpoint to ``model``.

    Args:
        model: the base transformers model the checkpoint was trained on (hidden size checked).
        directory: a folder written by pyreft's ``ReftModel.save``.
        positions: the positions string used in training (pyreft does not save it). With one
            intervention per layer the checkpoint is loaded with ``share_weights=True``; with two,
            the first is the ``first`` positions' intervention and the second the ``last``'s.

    Returns:
        A :class:`reft_ext.ReftModel` with R = rotate_layer.T, W = weight, b = bias (float32).
    """
    entries = read_pyreft_checkpoint(directory)
    if not entries:
        raise ValueError(f"{directory}: the checkpoint holds no interventions")
    by_layer: dict[int, list[PyreftIntervention]] = {}
    for entry in entries:
        by_layer.setdefault(entry.layer, []).append(entry)
    per_layer = {len(group) for group in by_layer.values()}
    if per_layer not in ({1}, {2}):
        raise ValueError(
            f"{directory}: expected 1 or 2 interventions at every layer, got {sorted(per_layer)}"
        )
    ranks = {entry.rank for entry in entries}
    if len(ranks) != 1:
        raise ValueError(f"{directory}: interventions of different ranks {sorted(ranks)}")
    width = entries[0].state["weight"].shape[1]
    if width != hidden_size(model):
        raise ValueError(
            f"{directory} was trained on hidden size {width}; this model has {hidden_size(model)}"
        )
    config = ReftConfig(
        layers=sorted(by_layer),
        rank=ranks.pop(),
        positions=positions,
        share_weights=per_layer == {1},
    )
    reft_model = get_reft_model(model, config)
    groups = reft_model._groups
    with torch.no_grad():
        for layer, group_entries in by_layer.items():
            if len(group_entries) != len(groups):
                raise ValueError(
                    f"positions={positions!r} gives position groups {groups} per layer, but the "
                    f"checkpoint has {len(group_entries)} interventions at layer {layer}"
                )
            for group, entry in zip(groups, group_entries, strict=True):
                module = reft_model.interventions[f"layer{layer}_{group}"]
                module.R.copy_(entry.state["rotate_layer"].T)
                module.W.copy_(entry.state["weight"])
                module.b.copy_(entry.state["bias"])
    return reft_model
