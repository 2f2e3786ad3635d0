"""Hugging Face drop-in: ReFT interventions at chosen blocks and token positions of a model."""

from .config import ReftConfig, intervention_key
from .model import CONFIG_NAME, WEIGHTS_NAME, ReftModel, get_reft_model

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ReftConfig",
    "ReftModel",
    "get_reft_model",
    "intervention_key",
]
