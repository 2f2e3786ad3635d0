"""One rank of a distributed test run: ``worker.py <mode> <out_dir>``.

Started by tests/distributed/launch.py with RANK, WORLD_SIZE, LOCAL_RANK and REFT_TEST_INIT (a
``file://`` rendezvous, so nothing listens on a network port; gloo itself connects over the
loopback interface). Writes ``rank<r>.pt`` ({"interventions", "losses", ...}) into out_dir.

Modes: ddp, fsdp2, fsdp2-bf16, trainer, trainer-resume, accelerate, fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from reft_ext.distributed import shard_base_model  # noqa: E402


def generate(reft_model):
    prompt = torch.tensor(common.PROMPT)
    with torch.no_grad():
        return reft_model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)


def run_ddp(out, rank, world):
    reft_model = common.make_reft_model()
    ddp = torch.nn.parallel.DistributedDataParallel(reft_model)
    optimizer = common.make_optimizer(reft_model)
    losses = common.train(ddp, reft_model, optimizer, rank, world)
    written = reft_model.save_pretrained(out / "adapter")  # rank 0 only (the default)
    tokens = generate(reft_model)
    return reft_model, {"losses": losses, "written": [str(p) for p in written], "tokens": tokens}


def run_fsdp2(out, rank, world, bf16=False):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    reft_model = common.make_reft_model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else None
    shard_base_model(reft_model, mp_policy=policy)
    optimizer = common.make_optimizer(reft_model)
    losses = common.train(reft_model, reft_model, optimizer, rank, world)
    written = reft_model.save_pretrained(out / "adapter")
    tokens = generate(reft_model)  # every rank: the sharded blocks gather their weights
    return reft_model, {"losses": losses, "written": [str(p) for p in written], "tokens": tokens}


def run_trainer(out, rank, world, resume=None):
    import transformers

    reft_model = common.make_reft_model()
    args = common.trainer_arguments(
        out / "trainer", common.GLOBAL_BATCH // world, ddp_backend="gloo"
    )
    assert args.world_size == world, args.world_size
    trainer = transformers.Trainer(
        model=reft_model, args=args, train_dataset=common.trainer_dataset()
    )
    forwards = []  # training steps this process ran (a resumed run starts at its checkpoint)
    reft_model.register_forward_pre_hook(lambda *_: forwards.append(1))
    trainer.train(resume_from_checkpoint=resume)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    written = reft_model.save_pretrained(out / "adapter")
    written = [str(p) for p in written]
    return reft_model, {"losses": losses, "written": written, "steps": len(forwards)}


def run_accelerate(out, rank, world):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world
    reft_model = common.make_reft_model()
    optimizer = common.make_optimizer(reft_model)
    wrapped, optimizer = accelerator.prepare(reft_model, optimizer)
    data = common.dataset()
    losses = []
    for step in range(common.STEPS):
        ids = data[common.rank_rows(step, rank, world)]
        optimizer.zero_grad()
        loss = wrapped(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()  # accelerate's wrapper steps the torch optimizer: retracted after it
        losses.append(loss.item())
    written = []
    if accelerator.is_main_process:
        written = accelerator.unwrap_model(wrapped).save_pretrained(out / "adapter")
    return reft_model, {"losses": losses, "written": [str(p) for p in written]}


def main():
    mode, out, rank, world = common.join_group()
    if mode == "ddp":
        reft_model, result = run_ddp(out, rank, world)
    elif mode in ("fsdp2", "fsdp2-bf16"):
        reft_model, result = run_fsdp2(out, rank, world, bf16=mode == "fsdp2-bf16")
    elif mode == "trainer":
        reft_model, result = run_trainer(out, rank, world)
    elif mode == "trainer-resume":
        checkpoint = out / "trainer" / f"checkpoint-{common.STEPS // 2}"
        reft_model, result = run_trainer(out, rank, world, resume=str(checkpoint))
    elif mode == "accelerate":
        reft_model, result = run_accelerate(out, rank, world)
    elif mode == "fail":
        reft_model = common.make_reft_model()
        ddp = torch.nn.parallel.DistributedDataParallel(reft_model)
        common.train(ddp, reft_model, common.make_optimizer(reft_model), rank, world, (1, 3))
        result = {}
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result["interventions"] = common.interventions(reft_model)
    torch.save(result, out / f"rank{rank}.pt")
    # Leave the group together: a rank that tears its gloo pairs down while the other is still
    # finishing (the Trainer's last saves) can abort that one's exit ("terminate called").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
