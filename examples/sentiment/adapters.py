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


#: LoReFT's ways of keeping R orthonormal (the pyreft parity study compares them): method name ->
#: (ReftConfig's orthogonality, keep_orthonormal's project_grad or None where nothing retracts).
LOREFT_VARIANTS = {
    "loreft": ("retraction", False),
    "loreft-riemannian": ("retraction", True),
    "loreft-householder": ("householder", None),
    "loreft-parametrization": ("parametrization", None),
}


def loreft(
    model: torch.nn.Module, layers: list[int], rank: int, positions: str, method: str = "loreft"
) -> Adapter:
    """LoReFT of rank ``rank`` at ``positions`` of the outputs of blocks ``layers``, R kept
    orthonormal the way ``method`` (a LOREFT_VARIANTS key) says."""
    orthogonality, project_grad = LOREFT_VARIANTS[method]
    config = reft_ext.ReftConfig(
        layers=layers, rank=rank, positions=positions, orthogonality=orthogonality
    )
    reft_model = reft_ext.get_reft_model(model, config)
    after_optimizer = None
    if project_grad is not None:

        def after_optimizer(optimizer):
            return reft_model.keep_orthonormal(optimizer, project_grad=project_grad)

    suffix = "" if method == "loreft" else f", {method.removeprefix('loreft-')}"
    return Adapter(
        name=f"LoReFT (reft_ext{suffix})",
        model=reft_model,
        params=[p for p in reft_model.parameters() if p.requires_grad],
        settings={"layers": layers, "rank": rank, "positions": positions, "method": method},
        after_optimizer=after_optimizer,
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
