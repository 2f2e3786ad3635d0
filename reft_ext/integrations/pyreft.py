"""pyreft interop: load checkpoints written by pyreft's ``ReftModel.save`` into reft_ext.

A pyreft checkpoint directory holds ``config.json`` (pyvene's config: ``representations``,
``intervention_types``, ``sorted_keys``) and one ``intkey_<key>.bin`` per intervention (a torch
pickle of its state dict). Every pyreft intervention type maps exactly onto one of reft_ext's
(:data:`PYREFT_TYPES`, keyed into reft_ext.modules.INTERVENTIONS): pyreft's orthogonal
``rotate_layer`` (embed_dim, rank) is R transposed, its ``learned_source`` is W and b (or b alone),
and NoReFT's ``proj_layer`` is R with its bias folded into b. Reading needs neither pyreft nor
pyvene.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..hf import ReftConfig, ReftModel, get_reft_model, intervention_key
from ..hf.blocks import hidden_size

# pyvene's RepresentationConfig fields, in the order config.json lists them (14 in all).
_LAYER, _COMPONENT, _UNIT, _MAX_UNITS, _RANK = range(5)
_FIELDS = 14
_SUPPORTED_COMPONENTS = {"block_output"}
_ROTATE = "rotate_layer.parametrizations.weight."  # torch's orthogonal parametrization's keys
#: How the drop-ins keep R orthonormal when their keyword ``orthogonality`` is not given (pyreft's
#: function of its parameter: a pyreft recipe trains the same); ``apply()`` may change it.
DROP_IN_ORTHOGONALITY_DEFAULT = "householder"

Tensors = dict[str, torch.Tensor]


def _need(state: Tensors, *keys: str) -> list[torch.Tensor]:
    """``state``'s tensors at ``keys``; KeyError naming the missing ones."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"lacks {missing} (has {sorted(state)})")
    return [state[k] for k in keys]


def rotation_from_state(state: Tensors) -> torch.Tensor:
    """R (rank, embed_dim) from a pyreft rotation's state: ``rotate_layer`` (embed_dim, rank), as
    pyreft's LoReFT and reft_ext's drop-ins save it, or torch's orthogonal parametrization of
    ``LowRankRotateLayer`` (its ``original`` and ``base``) evaluated as pyreft reads ``weight``.

    Raises:
        KeyError: neither form is complete, naming the keys present.
    """
    if "rotate_layer" in state:
        return state["rotate_layer"].T
    original, base = _need(state, _ROTATE + "original", _ROTATE + "0.base")
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty_like(original, dtype=torch.float32))
    nn.utils.parametrizations.orthogonal(holder, "weight")
    holder.load_state_dict(
        {"parametrizations.weight.original": original, "parametrizations.weight.0.base": base}
    )
    with torch.no_grad():
        return holder.weight.T.contiguous()


def _source(state: Tensors) -> Tensors:
    """W and b from pyreft's ``learned_source`` ``nn.Linear(embed_dim, rank)``."""
    W, b = _need(state, "learned_source.weight", "learned_source.bias")
    return {"W": W, "b": b}


def _loreft(state: Tensors) -> Tensors:
    # LoreftIntervention's own state_dict: the Linear's weight and bias, and the rotation's weight.
    weight, bias, _ = _need(state, "weight", "bias", "rotate_layer")
    return {"R": rotation_from_state(state), "W": weight, "b": bias}


def _noreft(state: Tensors) -> Tensors:
    # h + (W h + b − (P h + b_P)) P: R = P, and the projection's bias (add_bias) joins b.
    (P,) = _need(state, "proj_layer.weight")
    source = _source(state)
    if "proj_layer.bias" in state:
        source["b"] = source["b"] - state["proj_layer.bias"]
    return {"R": P, **source}


def _direft(state: Tensors) -> Tensors:
    return {"R": rotation_from_state(state), **_source(state)}


def _nodireft(state: Tensors) -> Tensors:
    # h + (W h + b) P: DiReFT with R = P (proj_layer's bias is not used by pyreft's forward).
    (P,) = _need(state, "proj_layer.weight")
    return {"R": P, **_source(state)}


def _constant_source(state: Tensors) -> Tensors:
    # ConsReFT and LoBiReFT: the learned source is the (rank,) parameter b itself.
    (b,) = _need(state, "learned_source")
    return {"R": rotation_from_state(state), "b": b}


#: pyreft intervention class -> (reft_ext.modules.INTERVENTIONS name, state dict -> R, W, b).
PYREFT_TYPES: dict[str, tuple[str, Callable[[Tensors], Tensors]]] = {
    "LoreftIntervention": ("loreft", _loreft),
    "LoreftIntervention_IdentityInit": ("loreft", _loreft),  # only its initialization differs
    "NoreftIntervention": ("noreft", _noreft),
    "DireftIntervention": ("direft", _direft),
    "NodireftIntervention": ("direft", _nodireft),
    "ConsreftIntervention": ("consreft", _constant_source),
    "LobireftIntervention": ("lobireft", _constant_source),
}


@dataclass
class PyreftIntervention:
    """One intervention of a pyreft checkpoint: where it sits, its pyreft class, its reft_ext
    registry name and its tensors in reft_ext's names (R (rank, d), W (rank, d) where the type has
    one, b (rank,))."""

    key: str
    layer: int
    component: str
    rank: int
    type_name: str
    intervention: str
    tensors: Tensors


def read_pyreft_checkpoint(directory: str | Path) -> list[PyreftIntervention]:
    """The interventions of a pyreft checkpoint, in ``sorted_keys`` order.

    Raises:
        FileNotFoundError: a file is missing. ValueError: an intervention type or component that
        reft_ext cannot represent (types: :data:`PYREFT_TYPES`; component: block_output), or an
        ``intkey_<key>.bin`` without the tensors its type needs.
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
        if type_name not in PYREFT_TYPES:
            raise ValueError(
                f"pyreft intervention {key!r} has type {type_name!r}; reft_ext imports "
                f"{sorted(PYREFT_TYPES)}"
            )
        component = representation[_COMPONENT]
        if component not in _SUPPORTED_COMPONENTS:
            raise ValueError(
                f"pyreft intervention {key!r} sits at component {component!r}; reft_ext supports "
                f"{sorted(_SUPPORTED_COMPONENTS)}"
            )
        path = directory / f"intkey_{key}.bin"
        state = torch.load(path, map_location="cpu", weights_only=True)
        name, convert = PYREFT_TYPES[type_name]
        try:
            tensors = convert(state)
        except KeyError as error:
            raise ValueError(f"{path} ({type_name}) {error.args[0]}") from None
        rank = int(representation[_RANK])
        width = tensors["R"].shape[-1]
        for tensor_name, tensor in tensors.items():
            expected = (rank,) if tensor_name == "b" else (rank, width)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{path} ({type_name}): {tensor_name} has shape {tuple(tensor.shape)}, "
                    f"expected {expected} for low_rank_dimension={rank}"
                )
        result.append(
            PyreftIntervention(
                key, int(representation[_LAYER]), component, rank, type_name, name, tensors
            )
        )
    return result


def load_pyreft_checkpoint(
    model: nn.Module, directory: str | Path, positions: str = "f1+l1"
) -> ReftModel:
    """Attach the interventions of a pyreft checkpoint to ``model``.

    Args:
        model: the base transformers model the checkpoint was trained on (hidden size checked).
        directory: a folder written by pyreft's ``ReftModel.save``, every intervention of one type
            (:data:`PYREFT_TYPES`) and rank.
        positions: the positions string used in training (pyreft does not save it). With one
            intervention per layer the checkpoint is loaded with ``share_weights=True``; with two,
            the first is the ``first`` positions' intervention and the second the ``last``'s.

    Returns:
        A :class:`reft_ext.ReftModel` whose interventions (float32) compute pyreft's. pyreft's
        ``act_fn`` is not saved in its checkpoint; the identity (its default) is assumed.
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
    kinds = {entry.type_name for entry in entries}
    if len(kinds) != 1:
        raise ValueError(f"{directory}: interventions of different types {sorted(kinds)}")
    width = entries[0].tensors["R"].shape[1]
    if width != hidden_size(model):
        raise ValueError(
            f"{directory} was trained on hidden size {width}; this model has {hidden_size(model)}"
        )
    config = ReftConfig(
        layers=sorted(by_layer),
        rank=ranks.pop(),
        intervention=entries[0].intervention,
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
                for name, tensor in entry.tensors.items():
                    getattr(module, name).copy_(tensor)
    return reft_model


def _rotation_state(R: torch.Tensor) -> Tensors:
    """The state of pyreft's ``orthogonal(LowRankRotateLayer)`` whose ``weight`` is Rᵀ: torch's
    parametrization set to Rᵀ through its right inverse, as pyreft's constructor does (the d×d
    ``base`` completes Rᵀ's columns with seeded random ones)."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(R.shape[1], R.shape[0]))
    nn.utils.parametrizations.orthogonal(holder, "weight")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        holder.weight = R.detach().T.to(torch.float32).cpu()
    return {
        _ROTATE + k.removeprefix("parametrizations.weight."): v
        for k, v in holder.state_dict().items()
    }


def _export_loreft(R, W, b, width) -> Tensors:
    return {"weight": W, "bias": b, "rotate_layer": R.T.contiguous()}


def _export_projection(R, W, b, width) -> Tensors:
    # NoReFT and DiReFT (free R) as pyreft's NoReFT/NodiReFT: R is proj_layer's weight, no bias.
    width = torch.tensor(width)
    return {
        "embed_dim": width,
        "interchange_dim": width.clone(),
        "proj_layer.weight": R,
        "learned_source.weight": W,
        "learned_source.bias": b,
    }


def _export_constant_source(R, W, b, width) -> Tensors:
    # torch's parametrization can only hold orthonormal rows: anything else would change R.
    error = (R @ R.T - torch.eye(R.shape[0])).abs().max().item()
    if not error <= 1e-4:
        raise ValueError(
            f"R's rows are not orthonormal (max |R Rᵀ − I| = {error:.2e}); pyreft's "
            "ConsReFT/LoBiReFT hold R as an orthogonal parametrization: retract it first "
            "(reft_ext.retract_)"
        )
    width = torch.tensor(width)
    return {
        "embed_dim": width,
        "interchange_dim": width.clone(),
        "learned_source": b,
        **_rotation_state(R),
    }


#: reft_ext's intervention name -> (the pyreft class that computes it exactly, its state dict
#: from R, W (None without one), b and the hidden size). DiReFT's R is free in reft_ext and
#: orthonormal in pyreft's DireftIntervention: its exact match is NodireftIntervention.
EXPORT_TYPES: dict[str, tuple[str, Callable[..., Tensors]]] = {
    "loreft": ("LoreftIntervention", _export_loreft),
    "noreft": ("NoreftIntervention", _export_projection),
    "direft": ("NodireftIntervention", _export_projection),
    "consreft": ("ConsreftIntervention", _export_constant_source),
    "lobireft": ("LobireftIntervention", _export_constant_source),
}


def save_pyreft_checkpoint(reft_model: ReftModel, directory: str | Path) -> list[Path]:
    """Write ``reft_model``'s interventions as a pyreft checkpoint folder, which pyreft's
    ``ReftModel.load(directory, model)`` and :func:`load_pyreft_checkpoint` read.

    pyvene's layout (``config.json`` with its representations, types and ``sorted_keys``
    ``layer_<l>_comp_block_output_unit_pos_nunit_1#<i>``; one ``intkey_<key>.bin`` per
    intervention), pyreft's classes (:data:`EXPORT_TYPES`) and their state dicts, float32. Per
    layer, the interventions in reft_ext's position-group order (first, then last; one when
    weights are shared). pyreft does not save positions, dropout or dtypes: pass the positions
    to the loader again, and pyvene rebuilds learned sources in bfloat16 (pyreft's default).
    pyreft's ConsReFT/LoBiReFT state holds its parametrization's d×d ``base`` (4·d² bytes per
    intervention). pyreft's own NoReFT/NodiReFT classes cannot be rebuilt by its load (they
    require ``add_bias``, which pyvene does not pass): load those under :func:`apply`.

    Args:
        reft_model: a :class:`reft_ext.ReftModel` with block-output interventions.
        directory: the folder (created if needed).

    Returns:
        The paths written (``config.json`` first).
    """
    config = reft_model.reft_config
    pyreft_name, export = EXPORT_TYPES[config.intervention]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys, representations, written = [], [], []
    for layer in reft_model.layers:
        for index, group in enumerate(reft_model._groups):
            module = reft_model.interventions[intervention_key(layer, group)]
            tensors = {
                name: getattr(module, name).detach().to(torch.float32).cpu().contiguous()
                for name in ("R", "W", "b")
                if hasattr(module, name)
            }
            try:
                state = export(tensors["R"], tensors.get("W"), tensors["b"], module.embed_dim)
            except ValueError as error:
                raise ValueError(f"{intervention_key(layer, group)}: {error}") from None
            key = f"layer_{layer}_comp_{config.component}_unit_pos_nunit_1#{index}"
            path = directory / f"intkey_{key}.bin"
            torch.save(state, path)
            written.append(path)
            keys.append(key)
            representation = [None] * _FIELDS
            representation[_LAYER], representation[_COMPONENT] = layer, config.component
            representation[_UNIT], representation[_MAX_UNITS] = "pos", 1
            representation[_RANK] = config.rank
            representations.append(representation)
    import transformers

    pyvene_config = {
        "intervention_constant_sources": [True] * len(keys),
        "intervention_dimensions": [reft_model._hidden_size] * len(keys),
        "intervention_types": [f"<class 'pyreft.interventions.{pyreft_name}'>"] * len(keys),
        "mode": "parallel",
        "representations": representations,
        "sorted_keys": keys,
        "transformers_version": transformers.__version__,
    }
    (directory / "config.json").write_text(json.dumps(pyvene_config, indent=2))
    return [directory / "config.json", *written]


class PyreftSwap:
    """What :func:`apply` replaced; :meth:`remove` puts pyreft's classes back. Also a context
    manager (the swap lasts for the ``with`` block)."""

    def __init__(self, replaced: list[tuple[ModuleType, str, type, type]], restore: dict):
        self._replaced = replaced
        self._restore = restore  # the drop-ins' defaults before the swap

    @property
    def replaced(self) -> list[str]:
        """``module.name`` of every name the swap rebound."""
        return [f"{module.__name__}.{name}" for module, name, _, _ in self._replaced]

    def remove(self) -> None:
        """Restore pyreft's classes wherever the swap put ours (and nothing else: a name rebound
        since is left alone). Idempotent."""
        for module, name, original, ours in self._replaced:
            if vars(module).get(name) is ours:
                setattr(module, name, original)
        self._replaced = []
        if self._restore:
            from .pyreft_interventions import DEFAULTS

            DEFAULTS.update(self._restore)
            self._restore = {}

    def __enter__(self) -> PyreftSwap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(orthogonality: str = DROP_IN_ORTHOGONALITY_DEFAULT) -> PyreftSwap:
    """Make pyreft's intervention classes reft_ext's drop-ins, reversibly (one line).

    Every loaded module that holds one of pyreft's six classes (``pyreft.LoreftIntervention``,
    ``pyreft.interventions.LoreftIntervention``, a user's ``from pyreft import ...``) gets the
    drop-in of the same name (:mod:`reft_ext.integrations.pyreft_interventions`), so pyreft's own
    code and examples run unchanged on the fused kernels, and pyvene's ``ReftModel.load`` of a
    checkpoint saved by pyreft's classes builds ours (which read pyreft's state dicts). Nothing
    else is patched.

    Args:
        orthogonality: how the drop-ins built during the swap keep R orthonormal when their
            constructor is not told (pyreft's code never is): ``"householder"`` (default;
            pyreft's parametrization as the same function of the same trained parameter, in
            O(d·r²): pyreft's training dynamics), ``"retraction"`` (R a plain parameter,
            retracted after each optimizer step) or ``"parametrization"`` (torch's, exactly
            pyreft's cost). Restored by ``remove()``.

    Returns:
        A :class:`PyreftSwap`: ``remove()`` restores pyreft's classes; ``with apply(): ...``
        limits the swap to a block.

    Raises:
        ImportError: pyreft is not installed.
    """
    try:
        import pyreft.interventions as pyreft_classes
    except ImportError as error:
        raise ImportError(
            "reft_ext.integrations.pyreft.apply() swaps pyreft's classes: install pyreft (see "
            "the README)"
        ) from error
    from .pyreft_interventions import DEFAULTS, DROP_INS, check_orthogonality

    check_orthogonality("apply", orthogonality)

    # Keyed by identity: the values scanned below may be unhashable.
    swaps = {
        id(original): (original, DROP_INS[name])
        for name in DROP_INS
        if isinstance(original := getattr(pyreft_classes, name, None), type)
    }
    replaced = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            # By identity only: touching a value's attributes can warn (deprecated objects).
            if id(value) in swaps and value is swaps[id(value)][0]:
                original, ours = swaps[id(value)]
                setattr(module, name, ours)
                replaced.append((module, name, original, ours))
    restore = {"orthogonality": DEFAULTS["orthogonality"]}
    DEFAULTS["orthogonality"] = orthogonality
    return PyreftSwap(replaced, restore)


def __getattr__(name: str):
    # The drop-ins subclass pyvene's interventions: imported on first access, so that importing
    # this module (the checkpoint reader) needs no pyvene.
    if name.endswith("Intervention"):
        from .pyreft_interventions import DROP_INS

        if name in DROP_INS:
            return DROP_INS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
