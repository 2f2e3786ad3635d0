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

from ..hf import ReftConfig, ReftModel, get_reft_model, intervention_key
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
                module = reft_model.interventions[intervention_key(layer, group)]
                module.R.copy_(entry.state["rotate_layer"].T)
                module.W.copy_(entry.state["weight"])
                module.b.copy_(entry.state["bias"])
    return reft_model


def _make_loreft_intervention():
    """Define LoreftIntervention on pyvene's base classes (imported only when asked for)."""
    try:
        from pyvene import (
            DistributedRepresentationIntervention,
            SourcelessIntervention,
            TrainableIntervention,
        )
        from transformers.activations import ACT2FN
    except ImportError as error:
        raise ImportError(
            "reft_ext.integrations.pyreft.LoreftIntervention subclasses pyvene's interventions: "
            "install pyreft (see the README) to use it"
        ) from error

    from ..functional import loreft
    from ..retraction import StiefelParameter

    class LoreftIntervention(
        SourcelessIntervention, TrainableIntervention, DistributedRepresentationIntervention
    ):
        """Drop-in for ``pyreft.LoreftIntervention`` in a ``pyreft.ReftConfig``.

        Same constructor keywords (``embed_dim``, ``low_rank_dimension``, ``dtype`` of the learned
        source, default bfloat16 as in pyreft; ``dropout``; ``act_fn``) and the same state-dict
        keys (``weight``, ``bias``, ``rotate_layer`` (d, r)), so pyreft's training, save and load
        keep working. The forward runs reft_ext's fused op (``act_fn`` None/"linear"; other
        activations use the composite); R (``self.R``, (r, d)) is a plain parameter kept
        orthonormal by :func:`reft_ext.keep_orthonormal` on the training optimizer, not by torch's
        parametrization. Dropout applies to the edit only.
        """

        def __init__(self, **kwargs):
            super().__init__(**kwargs, keep_last_dim=True)
            embed_dim, rank = int(self.embed_dim), int(kwargs["low_rank_dimension"])
            q = torch.linalg.qr(torch.randn(embed_dim, rank, dtype=torch.float64))[0]
            self.R = StiefelParameter(q.T.to(torch.float32).contiguous())
            self.learned_source = nn.Linear(embed_dim, rank).to(kwargs.get("dtype", torch.bfloat16))
            self.dropout = nn.Dropout(kwargs.get("dropout", 0.0))
            act_fn = kwargs.get("act_fn")
            self.linear_source = act_fn in (None, "linear")
            self.act_fn = ACT2FN["linear" if act_fn is None else act_fn]

        def forward(self, base, source=None, subspaces=None):
            W = self.learned_source.weight.float()
            b = self.learned_source.bias.float()
            if self.linear_source:
                edited = loreft(base, self.R, W, b)
            else:  # act(W h + b) − R h: the merged fused edit does not apply
                h = base.float()
                edited = h + (self.act_fn(h @ W.T + b) - h @ self.R.T) @ self.R
            return base + self.dropout(edited.to(base.dtype) - base)

        def state_dict(self, *args, **kwargs):
            """pyreft's keys: the learned source's ``weight``, ``bias``; ``rotate_layer`` = Rᵀ."""
            return {
                "weight": self.learned_source.weight.data,
                "bias": self.learned_source.bias.data,
                "rotate_layer": self.R.data.T,
            }

        def load_state_dict(self, state_dict, *args, **kwargs):
            with torch.no_grad():
                self.learned_source.weight.copy_(state_dict["weight"])
                self.learned_source.bias.copy_(state_dict["bias"])
                self.R.copy_(state_dict["rotate_layer"].T)

    return LoreftIntervention


def __getattr__(name: str):
    # LoreftIntervention is built on first access so that importing this module needs no pyvene.
    if name == "LoreftIntervention":
        cls = _make_loreft_intervention()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
