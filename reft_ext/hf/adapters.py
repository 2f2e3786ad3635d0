"""Named adapters: the names a ReftModel accepts, and one adapter's placement and modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules import INTERVENTIONS
from .config import Positions, ReftConfig, intervention_key

#: The name of the adapter ``get_reft_model`` and ``from_pretrained`` build (PEFT's default name);
#: ``save_pretrained`` writes it at the top of the folder, any other adapter in a subfolder.
DEFAULT_ADAPTER = "default"
#: The ``adapter_names`` entry of a row that runs the plain base model (PEFT's convention).
BASE_ADAPTER = "__base__"


def check_new_name(adapter_name, adapters: nn.ModuleDict) -> None:
    """Raise naming ``adapter_name`` unless it can name a new adapter in ``adapters``.

    A name must be a non-empty str without ".", not ``"__base__"`` and not taken; it becomes a
    key of an ``nn.ModuleDict`` (and of state-dict keys), so it may not shadow one of its
    attributes (``"keys"``, ``"training"``, ...) either.
    """
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
    if not adapter_name or "." in adapter_name or adapter_name == BASE_ADAPTER:
        raise ValueError(
            f"adapter_name must be a non-empty str without '.' other than {BASE_ADAPTER!r} "
            f"(which marks rows without an adapter), got {adapter_name!r}"
        )
    if adapter_name in adapters:
        raise ValueError(
            f"adapter_name {adapter_name!r} exists already (adapters: {list(adapters)}); "
            "delete_adapter it first or choose another name"
        )
    if hasattr(adapters, adapter_name):
        raise ValueError(
            f"adapter_name {adapter_name!r} is an attribute of torch.nn.ModuleDict, which holds "
            "the adapters; choose another name"
        )


def decode_group(groups: tuple[str, ...]) -> str:
    """The group whose intervention edits each new token of ``generate(intervene_on="all")``:
    ``last``, or the only group."""
    return "last" if "last" in groups else groups[-1]


@dataclass(frozen=True)
class AdapterSpec:
    """Where one adapter edits: its config, parsed positions, position groups and block indices."""

    config: ReftConfig
    positions: Positions
    groups: tuple[str, ...]
    layers: tuple[int, ...]

    @classmethod
    def of(cls, config: ReftConfig, num_blocks: int, hidden_size: int) -> AdapterSpec:
        """The spec of ``config`` on a model of ``num_blocks`` blocks of width ``hidden_size``;
        ValueError naming the field that does not fit (layer range, rank)."""
        if not isinstance(config, ReftConfig):
            raise TypeError(f"config must be a reft_ext.ReftConfig, got {type(config).__name__}")
        layers = range(num_blocks) if config.layers == "all" else config.layers
        for layer in layers:
            if not 0 <= layer < num_blocks:
                raise ValueError(f"layer {layer} out of range: the model has {num_blocks} blocks")
        if config.rank > hidden_size:
            raise ValueError(
                f"ReftConfig.rank {config.rank} exceeds the model's hidden size {hidden_size}"
            )
        positions = Positions.parse(config.positions)
        return cls(config, positions, positions.groups(config.share_weights), tuple(layers))

    def keys(self) -> list[str]:
        """The ``intervention_key`` of each of its interventions, layer by layer."""
        return [intervention_key(layer, group) for layer in self.layers for group in self.groups]

    def build(self, hidden_size: int, like: torch.Tensor) -> nn.ModuleDict:
        """Its interventions, {intervention_key: module} of width ``hidden_size``, on the device of
        the base model's parameter ``like``; the config's dtype must be float32 or ``like``'s."""
        config = self.config
        if config.torch_dtype not in (torch.float32, like.dtype):
            raise ValueError(
                f"ReftConfig.dtype must be float32 or the model's dtype ({like.dtype}), got "
                f"{config.dtype!r}: the fused ops take parameters in the hidden states' dtype or "
                "float32"
            )
        cls = INTERVENTIONS[config.intervention]
        kwargs = {"dropout": config.dropout, "dtype": config.torch_dtype, "device": like.device}
        if cls.orthonormal:
            kwargs["orthogonality"] = config.orthogonality
        return nn.ModuleDict({key: cls(hidden_size, config.rank, **kwargs) for key in self.keys()})
