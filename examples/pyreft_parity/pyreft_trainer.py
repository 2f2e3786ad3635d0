"""Training-dynamics parity through pyreft's own API and trainer: pyreft's LoreftIntervention
against reft_ext's drop-ins after the one-line swap.

run.py trains the tiny answer task with reft_ext's own API and a hand-written loop. This script
trains the same task the way a pyreft user does: ``pyreft.get_reft_model`` with a
``pyreft.ReftConfig`` (``pyreft.LoreftIntervention`` at the block output of blocks 1 and 2, rank
4, float32, dropout 0) and ``pyreft.ReftTrainerForCausalLM`` (transformers' Trainer). Variants:

- ``pyreft``: pyreft's own LoreftIntervention, untouched (torch's orthogonal parametrization of
  its (d, r) ``rotate_layer``);
- ``parametrization``, ``householder``, ``retraction``: the same pyreft code after
  ``reft_ext.integrations.pyreft.apply(orthogonality=...)``, so ``pyreft.LoreftIntervention``
  builds reft_ext's drop-in;
- ``parametrization, pyreft's base`` (a diagnostic): the ``parametrization`` drop-in given, in
  addition, pyreft's module's own parametrization state, the parameter X that Adam trains and the
  d×d base (torch draws the base's other d − r columns at random, so loading pyreft's state dict
  alone gives another base): the same function of the same X, R stored (r, d) instead of (d, r).

Every variant of a seed starts from the same intervention weights: pyreft's modules are built
under ``torch.manual_seed(seed + 1000)`` and their state dicts loaded into the drop-ins (checked:
the same output on a random h, ≤ 1e-5 relative). Data: run.py's ``tiny_task``, each example the
8-token prompt and its answer token, labels −100 but at the answer (so the trainer's shifted
causal-LM loss is run.py's answer-token cross-entropy at the last prompt position), interventions
at the prompt's first and last positions (f1+l1). Trainer: batch 32, 200 steps (one epoch of
200 × 32 examples), AdamW (``adamw_torch``) lr 1e-2 constant, no warmup, no weight decay,
transformers' default gradient clipping (max_grad_norm 1.0, as a pyreft user gets it;
``--max-grad-norm 0`` turns it off), seed and data_seed = the run's seed. pyreft's
ReftTrainerForCausalLM shuffles with its own ``DataLoader(shuffle=True)`` (so ``data_seed`` is
not used); the data order comes from the global seed the Trainer sets and is checked to be
identical across the variants of a seed, as are the initial weights.
Reported: the per-step loss the Trainer logs (rounded by it to 4 decimals), the loss and accuracy
on 256 held-out prompts (run.py's ``answer_loss_and_accuracy`` on the counterfactual logits),
max |R Rᵀ − I|, the largest difference of the final weights from the ``pyreft`` run's, and wall
times.

    PYTHONPATH=. .venv-pyreft/bin/python examples/pyreft_parity/pyreft_trainer.py \\
        --out parity-results      # results.json, table.md, losses.png

(pyreft 0.1.0 pins transformers 4.45.1: run it in the environment that has pyreft.)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyreft
import torch
import transformers
from run import PROMPT, answer_loss_and_accuracy, plot, study_parser, tiny_model, tiny_task
from seeds import mean_and_seeds, write_record

from reft_ext.integrations.pyreft import apply

DIAGNOSTIC = "parametrization, pyreft's base"
VARIANTS = ("pyreft", "parametrization", "householder", "retraction", DIAGNOSTIC)
LAYERS, RANK, EMBED = (1, 2), 4, 64
LOCATIONS = [0, PROMPT - 1]  # f1+l1: the prompt's first and last positions
KEYWORDS = {"embed_dim": EMBED, "low_rank_dimension": RANK, "dtype": torch.float32, "dropout": 0.0}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def pyreft_modules(seed: int) -> list[torch.nn.Module]:
    """pyreft's own LoreftIntervention for each of LAYERS, built under ``seed + 1000``: every
    variant's initial weights."""
    torch.manual_seed(seed + 1000)
    return [pyreft.LoreftIntervention(**KEYWORDS) for _ in LAYERS]


def interventions(variant: str, theirs: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The variant's modules for LAYERS, starting from pyreft's modules ``theirs``. Called inside
    ``apply()`` for the drop-ins: ``pyreft.LoreftIntervention`` is then reft_ext's."""
    if variant == "pyreft":
        return theirs
    ours = [pyreft.LoreftIntervention(**KEYWORDS) for _ in theirs]
    for mine, reference in zip(ours, theirs, strict=True):
        mine.load_state_dict(reference.state_dict())  # pyreft's form: learned source, rotate_layer
        if variant == DIAGNOSTIC:  # pyreft's parametrization itself, transposed: X and its base
            parametrization = reference.rotate_layer.parametrizations.weight
            with torch.no_grad():
                mine.rotation.parametrizations.R.original.copy_(parametrization.original.T)
                mine.rotation.parametrizations.R[0].base.copy_(parametrization[0].base)
        h = torch.randn(16, EMBED)
        with torch.no_grad():
            error = max_rel(mine(h), reference(h))
        assert error <= 1e-5, f"{variant}: the drop-in's start differs from pyreft's ({error:.1e})"
    return ours


class Collator:
    """Stacks the equal-length examples (pyreft's collator needs a tokenizer) and records the
    order in which the trainer draws them."""

    def __init__(self):
        self.order: list[int] = []

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        self.order.extend(int(e["index"]) for e in examples)
        keys = [k for k in examples[0] if k != "index"]
        return {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in keys}


def dataset(prompts: torch.Tensor, answers: torch.Tensor) -> list[dict]:
    """pyreft's examples: prompt + answer, the loss on the answer alone, f1+l1 locations."""
    examples = []
    for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        labels = torch.full((PROMPT + 1,), -100)
        labels[PROMPT] = answer
        examples.append({
            "index": index,
            "input_ids": torch.cat([prompt, answer.view(1)]),
            "attention_mask": torch.ones(PROMPT + 1, dtype=torch.long),
            "labels": labels,
            "intervention_locations": torch.tensor([LOCATIONS] * len(LAYERS)),
        })  # fmt: skip
    return examples


class Counterfactual:
    """``reft_model`` called as run.py's answer_loss_and_accuracy calls a model: pyvene's forward
    with the f1+l1 unit locations, its counterfactual (intervened) outputs."""

    def __init__(self, reft_model):
        self.reft_model = reft_model

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        locations = [[LOCATIONS] * len(input_ids)] * len(LAYERS)
        _, counterfactual = self.reft_model(
            {"input_ids": input_ids, "attention_mask": attention_mask},
            unit_locations={"sources->base": (None, locations)},
        )
        return counterfactual


def rotation(module: torch.nn.Module) -> torch.Tensor:
    """R (rank, embed_dim): pyreft's ``rotate_layer.weight`` is Rᵀ."""
    if hasattr(module, "rotate_layer"):
        return module.rotate_layer.weight.detach().T
    return module.R.detach()


def final_weights(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    """R, W and b of each module (pyreft's names for W, b: learned_source)."""
    return [
        tensor.detach().clone()
        for m in modules
        for tensor in (rotation(m), m.learned_source.weight, m.learned_source.bias)
    ]


def train(variant: str, seed: int, args: argparse.Namespace, work: Path) -> tuple[dict, list, list]:
    """One run through pyreft's trainer: the logged loss per step, the held-out loss and accuracy;
    the initial and the final weights."""
    start = time.perf_counter()
    model = tiny_model(seed)
    theirs = pyreft_modules(seed)  # pyreft's class (before the swap): the initial weights
    initial = final_weights(theirs)
    orthogonality = "parametrization" if variant == DIAGNOSTIC else variant
    swap = contextlib.nullcontext() if variant == "pyreft" else apply(orthogonality=orthogonality)
    with swap:
        modules = interventions(variant, theirs)
        representations = [
            {"layer": layer, "component": "block_output", "low_rank_dimension": RANK,
             "intervention": module}
            for layer, module in zip(LAYERS, modules, strict=True)
        ]  # fmt: skip
        reft_model = pyreft.get_reft_model(
            model, pyreft.ReftConfig(representations=representations)
        )
        reft_model.set_device("cpu")
        training = transformers.TrainingArguments(
            output_dir=str(work / f"{variant}-{seed}"),
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            max_grad_norm=args.max_grad_norm,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            use_cpu=True,
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        collator = Collator()
        trainer = pyreft.ReftTrainerForCausalLM(
            model=reft_model,
            args=training,
            train_dataset=dataset(*tiny_task(seed, args.steps * args.batch)),
            data_collator=collator,
        )
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        train_start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_start
        log = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert [entry["step"] for entry in log] == list(range(1, args.steps + 1))
        reft_model.eval()
        test_prompts, test_answers = tiny_task(seed + 500, 256)
        with torch.no_grad():
            test_loss, accuracy = answer_loss_and_accuracy(
                Counterfactual(reft_model), test_prompts, test_answers
            )
    orth = max(
        (R @ R.T - torch.eye(RANK)).abs().max().item() for R in map(rotation, modules)
    )  # fmt: skip
    run = {
        "variant": variant,
        "seed": seed,
        "losses": [entry["loss"] for entry in log],
        "grad_norms": [entry.get("grad_norm") for entry in log],
        "test_loss": test_loss.item(),
        "test_accuracy": accuracy,
        "orth_error": orth,
        "data_order_sha1": hashlib.sha1(json.dumps(collator.order).encode()).hexdigest(),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
    }
    return run, initial, final_weights(modules)


def summary_table(runs: list[dict]) -> str:
    """Per variant: the mean (and per-seed values) of the last 5 steps' loss, held-out loss and
    accuracy, the final weights' distance to pyreft's run, max |R Rᵀ − I| and the median time."""
    from reft_ext.bench.table import markdown_table

    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        last = [statistics.fmean(r["losses"][-5:]) for r in mine]
        rows.append([
            variant,
            mean_and_seeds(last),
            mean_and_seeds([r["test_loss"] for r in mine]),
            mean_and_seeds([r["test_accuracy"] for r in mine]),
            f"{max(r['weights_vs_pyreft'] for r in mine):.1e}",
            f"{max(r['orth_error'] for r in mine):.1e}",
            f"{statistics.median(r['seconds'] for r in mine):.1f}",
            f"{statistics.median(r['train_seconds'] for r in mine):.1f}",
        ])  # fmt: skip
    header = ["variant", "train loss, last 5 steps: mean (per seed)", "held-out loss",
              "held-out accuracy", r"max \|Δ final weights\| vs pyreft", r"max \|R Rᵀ − I\|",
              "median s / run", "of which trainer.train()"]  # fmt: skip
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="the Trainer's default")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for seed in range(args.seeds):
            start = reference = None
            for variant in VARIANTS:
                run, initial, weights = train(variant, seed, args, Path(work))
                if variant == "pyreft":
                    start, reference = initial, weights
                assert all(torch.equal(a, b) for a, b in zip(initial, start, strict=True))
                run["weights_vs_pyreft"] = max(
                    (a - b).abs().max().item() for a, b in zip(weights, reference, strict=True)
                )
                runs.append(run)
                last = statistics.fmean(run["losses"][-5:])
                print(
                    f"seed {seed} {variant:32s} last-5 loss {last:.4f} held-out loss "
                    f"{run['test_loss']:.4f} acc {run['test_accuracy']:.3f} "
                    f"|Δw| {run['weights_vs_pyreft']:.1e} {run['seconds']:.1f} s",
                    flush=True,
                )
            orders = {r["data_order_sha1"] for r in runs if r["seed"] == seed}
            assert len(orders) == 1, f"seed {seed}: the variants saw different data orders"
    arguments = {k: str(v) for k, v in vars(args).items()}
    versions = {
        name: importlib.metadata.version(name)
        for name in ("torch", "transformers", "pyreft", "pyvene")
    }
    results = {"task": "tiny, through pyreft's ReftTrainerForCausalLM", **versions,
               "args": arguments, "runs": runs}  # fmt: skip
    write_record(args.out, results, summary_table(runs))
    title = "tiny Llama answer task through pyreft's trainer: loss per step"
    plot(runs, args.out / "losses.png", VARIANTS, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
