"""Hugging Face drop-in: ReFT interventions at chosen blocks and token positions of a model."""

from .config import ReftConfig
from .model import ReftModel, get_reft_model

__all__ = ["ReftConfig", "ReftModel", "get_reft_model"]
