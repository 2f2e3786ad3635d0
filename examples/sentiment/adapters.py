"""The two adapters compared: LoReFT through reft_ext, LoRA through PEFT, on a fresh base model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import reft_ext


@dataclass
class Adapter:
    """A base model wrapped for training; ``params`` are the trainable tensors.

    ``after_optimizer`` registers what must run with each optimizer step (LoReFT: retraction).
    """

    name: str
    model: torch.nn.Module
    params: list[torch.Tensor]
    settings: dict
    after_optimizer: object = field(default=None)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def loreft(model: torch.nn.Module, layers: list[int], rank: int, positions: str) -> Adapter:
    """LoReFT of rank ``rank`` at ``positions`` of the outputs of blocks ``layers``."""
    config = reft_ext.ReftConfig(layers=layers, rank=rank, positions=positions)
    reft_model = reft_ext.get_reft_model(model, config)
    return Adapter(
        name="LoReFT (reft_ext)",
        model=reft_model,
        params=[p for p in reft_model.parameters() if p.requires_grad],
        settings={"layers": layers, "rank": rank, "positions": positions},
        after_optimizer=reft_model.keep_orthonormal,
    )


def lora(model: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> Adapter:
    """PEFT LoRA of rank ``rank`` (alpha 2·rank) on the modules named ``targets`` in all layers."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets))
    peft_model = get_peft_model(model, config)
    return Adapter(
        name="LoRA (PEFT)",
        model=peft_model,
        params=[p for p in peft_model.parameters() if p.requires_grad],
        settings={"rank": rank, "alpha": 2 * rank, "targets": list(targets)},
    )
