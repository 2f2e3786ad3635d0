"""One rank of a DeepSpeed test run: ``deepspeed_worker.py <mode> <out_dir>``.

Started by tests/test_deepspeed.py through tests/distributed/launch.py (file rendezvous, gloo on
the loopback interface). transformers.Trainer trains the tiny ReftModel of common.py with
``TrainingArguments(deepspeed=<ZeRO config>)`` on CPU; DeepSpeed's CPU accelerator uses the
gloo process group initialized here. Writes ``rank<r>.pt`` ({"interventions", "losses"}).

Modes:
    zero2, zero3: ZeRO stage 2 / 3 with reft_ext.distributed.zero_callback().
    zero3-partitioned: ZeRO-3 with stage3_param_persistence_threshold 0, so that the
        interventions too are partitioned between the ranks (the default threshold, 1e5
        elements, keeps parameters as small as these whole on every rank).
    zero2-no-callback: ZeRO-2 without the callback (R is then not retracted).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from reft_ext.distributed import zero_callback  # noqa: E402


def zero_config(stage: int, persistence_threshold: int | None = None) -> dict:
    """A DeepSpeed config for the Trainer: "auto" values are filled in from TrainingArguments;
    no "optimizer" entry, so the Trainer's torch AdamW is used (DeepSpeed then wants
    zero_allow_untested_optimizer); float32 throughout (no fp16/bf16 section)."""
    zero = {"stage": stage}
    if persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
    }


def gathered_interventions(reft_model) -> dict[str, torch.Tensor]:
    """The interventions' full tensors (ZeRO-3 partitions gathered) on every rank."""
    import deepspeed

    params = list(reft_model.interventions.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return common.interventions(reft_model)


def run(out: Path, world: int, stage: int, callback: bool, persistence_threshold=None):
    import transformers

    reft_model = common.make_reft_model()
    args = common.trainer_arguments(
        out / "trainer",
        common.GLOBAL_BATCH // world,
        deepspeed=zero_config(stage, persistence_threshold),
        ddp_backend="gloo",
        save_steps=10 * common.STEPS,  # no checkpoint: not what these runs test
    )
    assert args.world_size == world, args.world_size
    trainer = transformers.Trainer(
        model=reft_model,
        args=args,
        train_dataset=common.trainer_dataset(),
        callbacks=[zero_callback()] if callback else None,
    )
    trainer.train()
    engine = trainer.model_wrapped
    assert type(engine).__name__ == "DeepSpeedEngine", type(engine).__name__
    assert engine.zero_optimization_stage() == stage
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    r = next(iter(reft_model.interventions.values())).R
    return gathered_interventions(reft_model), {
        "losses": losses,
        "stage": engine.zero_optimization_stage(),
        "R_partitioned": hasattr(r, "ds_id") and not getattr(r, "ds_persist", False),
        "R_class": type(r).__name__,
    }


def main():
    mode, out, rank, world = common.join_group()
    if mode == "zero2":
        state, result = run(out, world, 2, callback=True)
    elif mode == "zero3":
        state, result = run(out, world, 3, callback=True)
    elif mode == "zero3-partitioned":
        state, result = run(out, world, 3, callback=True, persistence_threshold=0)
    elif mode == "zero2-no-callback":
        state, result = run(out, world, 2, callback=False)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result["interventions"] = state
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()  # leave together (see tests/distributed/worker.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
