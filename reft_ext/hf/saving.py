"""Adapter folders: what ``ReftModel.save_pretrained`` writes and ``from_pretrained`` /
``load_adapter`` read, and the checks of a folder against a base model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .blocks import find_blocks, hidden_size
from .config import ReftConfig

#: File names of a saved adapter, distinct from the base model's (``config.json``,
#: ``model.safetensors``) so that both can live in one folder.
CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "reft_model.safetensors"


def write_adapter(
    directory: Path, config: ReftConfig, interventions: nn.ModuleDict, model: nn.Module
) -> list[Path]:
    """Write one adapter into ``directory`` (created if needed): ``reft_config.json`` (the config
    and ``model``'s hidden size, block count and model type) and ``reft_model.safetensors`` (the
    interventions, keys ``<intervention_key>.<parameter>``). Returns the two paths."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    current = next(interventions.parameters()).dtype
    if current != config.torch_dtype:  # the interventions were cast after construction
        config = ReftConfig.from_dict(
            config.to_dict() | {"dtype": str(current).removeprefix("torch.")}
        )
    meta = {
        "reft_config": config.to_dict(),
        "hidden_size": hidden_size(model),
        "num_blocks": len(find_blocks(model)[1]),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    state = {k: v.detach().contiguous() for k, v in interventions.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    return [directory / CONFIG_NAME, directory / WEIGHTS_NAME]


def read_adapter(
    directory: str | Path, model: nn.Module, target: torch.device
) -> tuple[ReftConfig, dict[str, torch.Tensor], Path]:
    """(config, tensors on ``target``, weights path) of the adapter folder ``directory``, checked
    against ``model`` (hidden size, block count).

    Raises:
        FileNotFoundError: a file of the adapter is missing (named).
        ValueError: the folder does not fit ``model`` or is damaged; the message names the file
            and the key.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: an adapter folder holds the {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} that ReftModel.save_pretrained writes"
            )
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(meta).__name__}")
    for key in ("reft_config", "hidden_size", "num_blocks"):
        if key not in meta:
            raise ValueError(f"{config_path}: key {key!r} is missing")
    try:
        config = ReftConfig.from_dict(meta["reft_config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: key 'reft_config': {error}") from error
    for key, saved, actual in (
        ("hidden_size", meta["hidden_size"], hidden_size(model)),
        ("num_blocks", meta["num_blocks"], len(find_blocks(model)[1])),
    ):
        if saved != actual:
            raise ValueError(
                f"{config_path}: {key} is {saved}, this model's is {actual} (the adapter was "
                "saved for another model)"
            )
    try:
        state = load_file(str(weights_path), device=str(target))
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise ValueError(
            f"{weights_path}: not a readable safetensors file ({type(error).__name__}: {error})"
        ) from error
    return config, state, weights_path


def load_interventions(
    interventions: nn.ModuleDict, state: dict, weights_path: Path, target: torch.device
) -> None:
    """Check ``state`` (read from ``weights_path``) against ``interventions``, move them to
    ``target`` and load it; ValueError naming the file and the keys or shapes that differ."""
    expected = interventions.state_dict()
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"{weights_path}: tensors do not match {CONFIG_NAME}'s config: missing {missing}, "
            f"unknown {unknown}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{weights_path}: tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                f"needs {tuple(expected[key].shape)}"
            )
    interventions.to(target)
    interventions.load_state_dict(state)
