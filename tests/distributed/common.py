"""The training run every distributed test repeats: data, model, optimizer and loop.

Shared by the ranks (tests/distributed/worker.py) and by the single-process reference the tests
compute in the pytest process, so both sides train exactly the same thing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ (tiny_models)

import tiny_models  # noqa: E402

import reft_ext  # noqa: E402

STEPS = 20
GLOBAL_BATCH = 4  # rows per optimizer step over all ranks; each of 2 ranks takes 2
ROWS, LENGTH, VOCAB = 12, 8, 96
LR, WEIGHT_DECAY = 1e-2, 0.01
PROMPT = [[5, 17, 33, 8, 61, 2]]


def dataset() -> torch.Tensor:
    """(ROWS, LENGTH) token ids, no padding: every row's loss averages LENGTH − 1 tokens, so the
    mean of the ranks' losses is the loss of the union of their rows."""
    return torch.randint(3, VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(7))


def global_rows(step: int) -> list[int]:
    """The dataset rows of optimizer step ``step`` (sequential, wrapping around)."""
    return [(step * GLOBAL_BATCH + j) % ROWS for j in range(GLOBAL_BATCH)]


def rank_rows(step: int, rank: int, world: int) -> list[int]:
    rows = global_rows(step)
    per_rank = len(rows) // world
    return rows[rank * per_rank : (rank + 1) * per_rank]


def make_reft_model(dtype: torch.dtype = torch.float32) -> reft_ext.ReftModel:
    """The tiny Llama (seed 0) with LoReFT rank 4 at both layers, first and last token."""
    model = tiny_models.tiny_llama(seed=0, vocab=VOCAB, dtype=dtype)
    torch.manual_seed(1)
    return reft_ext.get_reft_model(
        model, reft_ext.ReftConfig(layers="all", rank=4, positions="f1+l1")
    )


def make_optimizer(reft_model: reft_ext.ReftModel) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        reft_model.interventions.parameters(), lr=LR, weight_decay=WEIGHT_DECAY
    )


def train(call, reft_model, optimizer, rank: int = 0, world: int = 1, fail_at=None):
    """STEPS optimizer steps; ``call`` runs the (possibly wrapped) model. Returns the losses.

    fail_at: (rank, step) at which that rank raises, for the failure test.
    """
    data = dataset()
    losses = []
    for step in range(STEPS):
        if fail_at == (rank, step):
            raise RuntimeError(f"rank {rank} fails on purpose at step {step}")
        ids = data[rank_rows(step, rank, world)]
        optimizer.zero_grad()
        loss = call(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()  # R retracted after it (the automatic retraction)
        losses.append(loss.item())
    return losses


def interventions(reft_model) -> dict[str, torch.Tensor]:
    """A detached copy of the interventions' tensors (float32)."""
    return {k: v.detach().float().clone() for k, v in reft_model.interventions.state_dict().items()}


def trainer_arguments(output_dir, per_device: int, **extra):
    """transformers.TrainingArguments for the Trainer runs: the same STEPS, LR, weight decay and
    sequential data order as :func:`train` (so one process with GLOBAL_BATCH rows and two ranks
    with half each see the same rows at every step)."""
    import transformers

    options = {"max_steps": STEPS, "save_steps": STEPS // 2} | extra
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        report_to=[],
        per_device_train_batch_size=per_device,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="constant",
        warmup_steps=0,
        train_sampling_strategy="sequential",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="steps",
        seed=0,
        **options,
    )


def trainer_dataset() -> list[dict[str, torch.Tensor]]:
    """The rows of :func:`dataset` in the order :func:`train` visits them, for a sequential
    sampler: STEPS × GLOBAL_BATCH examples."""
    data = dataset()
    order = [row for step in range(STEPS) for row in global_rows(step)]
    return [{"input_ids": data[row], "labels": data[row]} for row in order]


def max_rel_state(got: dict, want: dict) -> float:
    """The largest relative difference, tensor by tensor, of two state dicts with the same keys."""
    assert got.keys() == want.keys()
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


def join_group() -> tuple[str, Path, int, int]:
    """A rank started by launch.py: (mode, output folder) from its command line, (rank, world
    size) from its environment, and the gloo group joined through REFT_TEST_INIT."""
    import torch.distributed as dist

    mode, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", init_method=os.environ["REFT_TEST_INIT"], rank=rank, world_size=world
    )
    return mode, out, rank, world
