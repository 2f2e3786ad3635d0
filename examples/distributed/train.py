"""Train LoReFT on several processes: DDP, FSDP2 or the Hugging Face Trainer.

CPU (gloo), 2 processes, a tiny random Llama (no downloads):

    torchrun --nproc_per_node 2 examples/distributed/train.py --engine ddp
    torchrun --nproc_per_node 2 examples/distributed/train.py --engine fsdp2 --bf16
    torchrun --nproc_per_node 2 examples/distributed/train.py --engine trainer
    torchrun --nproc_per_node 2 examples/distributed/train.py --engine accelerate

(``accelerate launch`` starts several CPU processes only through ``mpirun``, with
``--mpirun_hostfile``; under torchrun, accelerate's ``Accelerator`` joins the torchrun group.)

GPUs (nccl; one process per GPU): the same commands with ``--device cuda`` and
``--nproc_per_node <GPUs>``, or ``accelerate launch --multi_gpu --num_processes <GPUs>
examples/distributed/train.py --engine accelerate --device cuda``; ``--model <path>`` for a real
checkpoint.

Every rank trains on its own rows of each global batch; the interventions' gradients are
averaged (by DDP, or by reft_ext.distributed.average_gradients beside FSDP2) and R is retracted
after every step on every rank (the automatic retraction), so the ranks stay identical. Rank 0
writes the adapter folder.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import reft_ext
from reft_ext.distributed import is_main_process, shard_base_model


def tiny_llama(vocab: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    engines = ["ddp", "fsdp2", "trainer", "accelerate"]
    parser.add_argument("--engine", choices=engines, default="ddp")
    parser.add_argument("--model", help="a transformers causal LM folder (default: tiny random)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--bf16", action="store_true", help="FSDP2: compute the blocks in bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank and step")
    parser.add_argument("--out", default="reft-distributed")
    args = parser.parse_args()

    import transformers

    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    else:
        model = tiny_llama(vocab=128)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(3, vocab, (args.steps * args.batch * 8, 16), generator=generator)
    config = reft_ext.ReftConfig(layers="all", rank=4, positions="f1+l1")

    if args.engine == "trainer":  # Trainer initializes the process group and wraps in DDP
        reft_model = reft_ext.get_reft_model(model, config)
        training = transformers.TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=1e-2,
            weight_decay=0.01,
            use_cpu=args.device == "cpu",
            ddp_backend="gloo" if args.device == "cpu" else "nccl",
            ddp_find_unused_parameters=False,  # every intervention is used
            remove_unused_columns=False,  # ReftModel.forward takes **kwargs
            report_to=[],
            save_strategy="no",
            logging_steps=5,
        )
        rows = [{"input_ids": ids, "labels": ids} for ids in data]
        transformers.Trainer(model=reft_model, args=training, train_dataset=rows).train()
        reft_model.save_pretrained(args.out)  # rank 0 writes
        return

    if args.engine == "accelerate":  # accelerate initializes the group and wraps in DDP
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=args.device == "cpu")
        reft_model = reft_ext.get_reft_model(model.to(accelerator.device), config)
        optimizer = torch.optim.AdamW(
            reft_model.interventions.parameters(), lr=1e-2, weight_decay=0.01
        )
        trained, optimizer = accelerator.prepare(reft_model, optimizer)
        rank, world = accelerator.process_index, accelerator.num_processes
        for step in range(args.steps):
            start = (step * world + rank) * args.batch
            ids = data[start : start + args.batch].to(accelerator.device)
            optimizer.zero_grad()
            loss = trained(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()  # accelerate's wrapper steps the torch optimizer: R retracted
        print(f"rank {rank} final loss {loss.item():.4f}", flush=True)
        reft_model.save_pretrained(args.out)  # rank 0 writes
        return

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    reft_model = reft_ext.get_reft_model(model.to(device), config)
    if args.engine == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(reft_model)
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if args.bf16 else None
        shard_base_model(reft_model, mp_policy=policy)
        trained = reft_model
    optimizer = torch.optim.AdamW(reft_model.interventions.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(args.steps):
        start = (step * world + rank) * args.batch
        ids = data[start : start + args.batch].to(device)
        optimizer.zero_grad()
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()  # R is retracted right after, on every rank
        if step % 5 == 0 or step == args.steps - 1:
            print(f"rank {rank} step {step}: loss {loss.item():.4f}", flush=True)
    written = reft_model.save_pretrained(args.out)
    if is_main_process():
        print(f"rank {rank} wrote {[str(p) for p in written]}")
    dist.barrier()  # leave the group together: no rank tears it down under another's feet
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
