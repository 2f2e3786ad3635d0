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

- DeepSpeed ZeRO (stage 1, 2, 3): its optimizer steps flattened float32 copies of the
  parameters, which the automatic retraction cannot recognize as R, so R is retracted by
  :func:`retract_zero_` after each step; and ZeRO-3 must gather the interventions before a
  ReftModel's block hooks use them (:func:`prepare_zero3`). With ``transformers.Trainer(...,
  args=TrainingArguments(deepspeed=...))`` one callback does both: :func:`zero_callback`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .hf.blocks import find_blocks
from .hf.model import ReftModel
from .retraction import METHODS, is_stiefel, retract_list_


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
        The :func:`average_gradients` handle of the trainable parameters of
        ``reft_model.adapters``: the active adapter's, and those of any adapter made trainable
        with ``set_requires_grad`` before this call (several adapters trained in mixed batches).

    The optimizer is built over those parameters (plain tensors, not DTensors), so the automatic
    retraction after each step works as in one process.
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
    return average_gradients(reft_model.adapters, group)


# ---- DeepSpeed ZeRO ----------------------------------------------------------------------------


def prepare_zero3(reft_model: ReftModel) -> None:
    """Make a ReftModel trainable under DeepSpeed ZeRO stage 3; call it before
    ``deepspeed.initialize`` (or let :func:`zero_callback` call it).

    ZeRO-3 gathers a module's partitioned parameters when that module's ``forward`` starts. The
    block hooks hand each intervention's parameters to autograd before calling the
    intervention, so without this its first backward fails ("returned an invalid gradient ...
    expected shape compatible with [0]"). This registers every intervention parameter (all
    adapters) as a ZeRO-3 external parameter of ``reft_model``
    (``deepspeed.zero.register_external_parameter``): they are gathered when the ReftModel's
    forward starts. Harmless under stages 0-2 and without DeepSpeed's engine; needs deepspeed.
    """
    import deepspeed

    if not isinstance(reft_model, ReftModel):
        raise TypeError(
            f"prepare_zero3: reft_model must be a reft_ext.ReftModel, got "
            f"{type(reft_model).__name__}"
        )
    for param in reft_model.adapters.parameters():
        deepspeed.zero.register_external_parameter(reft_model, param)


def retract_zero_(module: nn.Module, method: str = "cholqr2") -> list[nn.Parameter]:
    """Retract the marked parameters (R) of ``module`` after a DeepSpeed ZeRO optimizer step:
    their float32 master copies held by the ZeRO optimizer, and the model's parameters.

    ZeRO (stages 1-3) steps flattened float32 partitions, not the parameters, so the automatic
    retraction never sees R there. Each R is gathered whole from its master partitions
    (``deepspeed.utils.safe_get_full_fp32_param``), retracted, written back to the masters
    (``safe_set_full_fp32_param``) and to the model's copy (under ZeRO-3 through
    ``deepspeed.zero.GatheredParameters``). Every rank computes the same retraction of the same
    gathered R, so the ranks stay in agreement; this equals one process's AdamW step followed
    by the automatic retraction.

    A collective: every rank must call it, after each optimizer step (``engine.step()``), e.g.
    through :func:`zero_callback` with ``transformers.Trainer``.

    Args:
        module: the model given to DeepSpeed (a ReftModel, or anything holding marked R).
        method: the retraction method (:data:`reft_ext.retraction.METHODS`).

    Returns:
        The parameters retracted: the marked ones that a ZeRO optimizer holds (none under
        ZeRO stage 0, where the optimizer steps the parameters themselves and the automatic
        retraction already retracted them).
    """
    if method not in METHODS:
        raise ValueError(f"retract_zero_: method must be one of {list(METHODS)}, got {method!r}")
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    marked = [
        p
        for p in module.parameters()
        if is_stiefel(p) and p.requires_grad and (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"))
    ]
    if not marked:
        return []
    shapes = [tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape) for p in marked]
    masters = [
        safe_get_full_fp32_param(p).reshape(shape) for p, shape in zip(marked, shapes, strict=True)
    ]
    retract_list_(masters, method)
    for p, master in zip(marked, masters, strict=True):
        safe_set_full_fp32_param(p, master)
    partitioned = [p for p in marked if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        # Every rank holds the same retracted masters; rank 0's copy is broadcast and
        # partitioned again on leaving the context.
        gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
    else:
        import contextlib

        gathered = contextlib.nullcontext()
    with gathered, torch.no_grad():
        for p, master in zip(marked, masters, strict=True):
            p.data.copy_(master.to(p.dtype))
    return marked


def zero_callback(method: str = "cholqr2"):
    """A ``transformers.TrainerCallback`` for ``Trainer(args=TrainingArguments(deepspeed=...))``
    with a ReftModel: at the Trainer's creation it calls :func:`prepare_zero3` (when
    ``deepspeed=`` is set), and after every optimizer step :func:`retract_zero_`.

    Pass it as ``transformers.Trainer(..., callbacks=[reft_ext.distributed.zero_callback()])``.
    Without it, R drifts off the Stiefel manifold under ZeRO stages 1-3 (the automatic
    retraction does not reach ZeRO's flattened masters) and ZeRO-3's first backward fails.
    """
    import transformers

    if method not in METHODS:
        raise ValueError(f"zero_callback: method must be one of {list(METHODS)}, got {method!r}")

    class ReftZeroCallback(transformers.TrainerCallback):
        def on_init_end(self, args, state, control, model=None, **kwargs):
            if args.deepspeed and isinstance(model, ReftModel):
                prepare_zero3(model)

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if args.deepspeed and model is not None:
                retract_zero_(model, method)

    return ReftZeroCallback()
