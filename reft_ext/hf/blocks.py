"""Finding a transformers model's repeated blocks, and reading/writing a block's output."""

from __future__ import annotations

import torch
from torch import nn

# model_type -> dotted path of the block list, for models where the generic search is ambiguous.
BLOCK_PATHS: dict[str, str] = {}


def _config_value(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def hidden_size(model: nn.Module) -> int:
    """The width d of the hidden states (``config.hidden_size`` or an alias)."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) if config is not None else None
    value = None
    for cfg in (config, text_config):
        if cfg is not None and value is None:
            value = _config_value(cfg, "hidden_size", "n_embd", "d_model")
    if value is None:
        raise ValueError("the model's config has no hidden_size (nor n_embd, d_model)")
    return value


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, module list) of the model's repeated transformer blocks.

    Generic rule: the nn.ModuleList whose children all share one class and whose length equals
    ``config.num_hidden_layers`` (the first in module order when several do). ``BLOCK_PATHS``
    names the list for model types where that rule does not apply.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in BLOCK_PATHS:
        return BLOCK_PATHS[model_type], model.get_submodule(BLOCK_PATHS[model_type])
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers") if config else None
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and (layers is None or len(module) == layers):
                candidates.append((name, module))
    if not candidates:
        raise ValueError(
            f"no block list found in {type(model).__name__} (model_type={model_type!r}): expected "
            f"an nn.ModuleList of {layers} identical blocks; add its path to "
            "reft_ext.hf.blocks.BLOCK_PATHS"
        )
    return candidates[0]


def block_hidden(output) -> torch.Tensor:
    """The hidden states (B, T, d) a block returned: the output itself or its first element."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise TypeError(
            f"expected a block to return hidden states (B, T, d) or a tuple starting with them, "
            f"got {type(hidden).__name__}"
        )
    return hidden
