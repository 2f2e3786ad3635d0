"""Distributed training of a ReftModel on torch.distributed (DDP, FSDP2, Trainer, accelerate).

- DDP: wrap the ReftModel in ``DistributedDataParallel`` as it is (the base is frozen, so DDP
  reduces only the interventions' gradients). Nothing from here is needed.
- FSDP2: :func:`shard_base_model` shards the base model's blocks with ``fully_shard`` and keeps the
  interventions whole on every rank, with their gradients averaged by
  :func:`average_gradients`. The interventions are tiny (2·r·d + r numbers each), and a shard of
  R's rows is not something a retraction can orthonormalize.
- ``transformers.Trainer`` and accelerate wrap the model in DDP themselves.

In every case each rank's optimizer steps the same averaged gradients and the automatic
retraction (reft_ext.retraction) retracts R identically after each step: the retraction is
deterministic, so the ranks stay bit-identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .hf.blocks import find_blocks
from .hf.model import ReftModel


def is_main_process() -> bool:
    """Whether this process writes files: rank 0 of an initialized default process group, or
    the only process when torch.distributed is not initialized (or not available)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class GradientAveraging:
    """Handle of :func:`average_gradients`; ``remove()`` detaches its hooks."""

    def __init__(self, params: list[nn.Parameter], group):
        self.params = params
        self._group = group
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _on_grad(self, _param) -> None:
        # The first gradient of a backward pass queues one reduction for the end of that pass
        # (as DDP does), so each backward costs one all-reduce per dtype, not one per parameter.
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce)

    def _reduce(self) -> None:
        self._queued = False
        world = dist.get_world_size(self._group)
        # Which parameters have a gradient on any rank: a parameter unused everywhere keeps
        # grad None (as in one process); one used on some ranks gets zeros on the others.
        present = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32)
        dist.all_reduce(present, group=self._group)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p, count in zip(self.params, present.tolist(), strict=True):
            if count:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                by_dtype.setdefault(p.grad.dtype, []).append(p)
        for members in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in members])
            dist.all_reduce(flat, group=self._group)
            flat.div_(world)
            offset = 0
            for p in members:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def average_gradients(module: nn.Module, group=None) -> GradientAveraging:
    """Average the gradients of ``module``'s trainable parameters over the ranks of ``group``
    at the end of every backward pass (one all-reduce per dtype), for parameters kept whole on
    every rank outside DDP (e.g. the interventions beside an FSDP2-sharded base).

    Args:
        module: e.g. ``reft_model.interventions``; every rank must hold the same parameters in
            the same order.
        group: the process group; default: the default group (must be initialized).

    Returns:
        A :class:`GradientAveraging` handle (``remove()`` detaches it).

    The average is the plain mean over ranks, as DDP's: it equals one process's gradient on the
    union of the batches when each rank's loss is a mean over the same number of terms (equal
    per-rank batches and, for a token-level loss, equal numbers of label tokens). With gradient
    accumulation every backward reduces (correct, as the mean of equal accumulated parts is
    unchanged).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "average_gradients: torch.distributed is not initialized (call "
            "torch.distributed.init_process_group first, e.g. under torchrun)"
        )
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("average_gradients: module has no trainable parameter")
    return GradientAveraging(params, group)


def shard_base_model(
    reft_model: ReftModel,
    mesh=None,
    mp_policy=None,
    reshard_after_forward: bool = True,
    group=None,
) -> GradientAveraging:
    """FSDP2: shard the base model of ``reft_model`` (each block, then the rest) with
    ``torch.distributed.fsdp.fully_shard``; keep the interventions whole, gradients averaged.

    Args:
        reft_model: a :class:`reft_ext.ReftModel` (built before sharding, as its hooks sit on
            the blocks).
        mesh: FSDP2's ``DeviceMesh``; default: one dimension over all ranks, on the model's
            device type.
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` for the base model, e.g.
            ``param_dtype=torch.bfloat16``: the blocks then compute and output bfloat16, which
            the float32 interventions edit (the fused ops take float32 parameters with bfloat16
            hidden states).
        reshard_after_forward: FSDP2's option, applied to every block.
        group: process group of the interventions' gradient average; default: the default group.

    Returns:
        The :func:`average_gradients` handle of ``reft_model.interventions``.

    The optimizer is built over ``reft_model.interventions.parameters()`` (plain tensors, not
    DTensors), so the automatic retraction after each step works as in one process.
    """
    from torch.distributed.fsdp import fully_shard

    if not isinstance(reft_model, ReftModel):
        raise TypeError(
            f"shard_base_model: reft_model must be a reft_ext.ReftModel, got "
            f"{type(reft_model).__name__}"
        )
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = next(reft_model.model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    _, blocks = find_blocks(reft_model.model)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(reft_model.model, **options)
    return average_gradients(reft_model.interventions, group)
