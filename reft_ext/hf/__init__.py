"""Hugging Face drop-in: ReFT interventions at chosen blocks and token positions of a model."""

from .adapters import BASE_ADAPTER, DEFAULT_ADAPTER
from .config import ReftConfig, intervention_key
from .model import ReftModel, get_reft_model
from .saving import CONFIG_NAME, WEIGHTS_NAME

__all__ = [
    "BASE_ADAPTER",
    "CONFIG_NAME",
    "DEFAULT_ADAPTER",
    "WEIGHTS_NAME",
    "ReftConfig",
    "ReftModel",
    "get_reft_model",
    "intervention_key",
]
