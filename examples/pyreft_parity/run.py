"""Training-dynamics parity with pyreft: does a pyreft user's recipe train the same with reft_ext?

pyreft keeps LoReFT's R orthonormal with torch's orthogonal parametrization (Adam steps an
unconstrained X; R = base · HH(X)). reft_ext offers three ways; this script trains each, and
pyreft's, from the same initial weights on the same data with the same optimizer and learning rate,
over several seeds, and reports the loss curves and held-out accuracy:

- ``parametrization``: torch's orthogonal parametrization, what pyreft's LoreftIntervention trains
  (``orthogonality="parametrization"``: the same function of the same X as pyreft's rotate_layer,
  stored (r, d) instead of (d, r), which Adam's per-element steps do not see);
- ``householder``: the same function in O(d·r²) (reft_ext.householder), its base completed
  deterministically instead of at random;
- ``retraction``: Adam on R itself, retracted onto orthonormal rows after each step (the
  default of reft_ext's own ReftConfig; the pyreft drop-ins default to ``householder``);
- ``riemannian``: the same with the Riemannian gradient (``keep_orthonormal(project_grad=True)``).

Task ``tiny``: a random tiny Llama (d = 64, 4 blocks, weights drawn with std 0.3 so that its
logits span a range an edit can move) frozen; a prompt of 8 random tokens from a
vocabulary of 48 whose answer is one of 8 tokens, a fixed random function of the prompt's last
token; LoReFT rank 4 at blocks 1 and 2, ``f1+l1``; loss: cross-entropy of the answer token
at the last position; batch 32, AdamW (no weight decay: pyreft's trainers' default), lr 1e-2,
200 steps; loss and accuracy on 256 held-out prompts (chance: 1/8).

    python examples/pyreft_parity/run.py --out parity-results      # JSON, Markdown table, PNG
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from seeds import mean_and_seeds, plot_seed_band, write_record

import reft_ext

VARIANTS = ("parametrization", "householder", "retraction", "riemannian")
PROMPT, VOCAB, ANSWERS = 8, 48, 8


def tiny_task(seed: int, examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts (examples, PROMPT) in [3, VOCAB), answers (examples,) in [VOCAB, VOCAB +
    ANSWERS)): the answer is a fixed random function of the prompt's last token, drawn once."""
    table = torch.randint(0, ANSWERS, (VOCAB,), generator=torch.Generator().manual_seed(99))
    data = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, VOCAB, (examples, PROMPT), generator=data)
    return prompts, VOCAB + table[prompts[:, -1]]


def tiny_model(seed: int):
    """The frozen random Llama of the task (vocabulary VOCAB + ANSWERS), seeded."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB + ANSWERS, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        initializer_range=0.3,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def answer_loss_and_accuracy(reft_model, prompts, answers) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the answer at the last position, and the argmax accuracy over the
    ANSWERS tokens."""
    logits = reft_model(input_ids=prompts, attention_mask=torch.ones_like(prompts)).logits[:, -1]
    loss = torch.nn.functional.cross_entropy(logits, answers)
    predicted = VOCAB + logits[:, VOCAB:].argmax(-1)
    return loss, (predicted == answers).float().mean().item()


def train(variant: str, seed: int, steps: int, lr: float, batch: int) -> dict:
    """One run: the loss at every step and the held-out accuracy at the end."""
    model = tiny_model(seed)
    orthogonality = "retraction" if variant == "riemannian" else variant
    torch.manual_seed(seed + 1000)  # the interventions' initial weights: the same for every variant
    config = reft_ext.ReftConfig(
        layers=[1, 2], rank=4, positions="f1+l1", orthogonality=orthogonality
    )
    reft_model = reft_ext.get_reft_model(model, config)
    trainable = [p for p in reft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    if variant == "riemannian":
        reft_ext.keep_orthonormal(optimizer, project_grad=True)
    prompts, answers = tiny_task(seed, steps * batch)
    losses = []
    reft_model.train()
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        loss, _ = answer_loss_and_accuracy(reft_model, prompts[rows], answers[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    reft_model.eval()
    test_prompts, test_answers = tiny_task(seed + 500, 256)
    with torch.no_grad():
        test_loss, accuracy = answer_loss_and_accuracy(reft_model, test_prompts, test_answers)
    orth = max(
        (R @ R.T - torch.eye(R.shape[0])).abs().max().item()
        for name, m in reft_model.interventions.items()
        for R in [m.R.detach()]
    )
    return {"variant": variant, "seed": seed, "losses": losses, "test_loss": test_loss.item(),
            "test_accuracy": accuracy, "orth_error": orth}  # fmt: skip


def summary_table(runs: list[dict]) -> str:
    """Per variant: the mean (and per-seed values) of the last 5 steps' loss, held-out loss and
    accuracy."""
    from reft_ext.bench.table import markdown_table

    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        last = [statistics.fmean(r["losses"][-5:]) for r in mine]
        test = [r["test_loss"] for r in mine]
        acc = [r["test_accuracy"] for r in mine]
        rows.append([
            variant,
            mean_and_seeds(last),
            mean_and_seeds(test),
            mean_and_seeds(acc),
            f"{max(r['orth_error'] for r in mine):.1e}",
        ])  # fmt: skip
    header = ["variant", "train loss, last 5 steps: mean (per seed)", "held-out loss",
              "held-out accuracy", "max |R Rᵀ − I|"]  # fmt: skip
    return markdown_table(header, rows)


def plot(
    runs: list[dict],
    path: Path,
    variants: tuple[str, ...] = VARIANTS,
    title: str = "tiny Llama answer task: loss per step",
) -> bool:
    """Loss curves, one line per variant (mean over seeds) with the seeds' range shaded."""
    from reft_ext.bench.plot import agg_figure

    fig = agg_figure(path, figsize=(7, 4), layout="constrained")
    if fig is None:
        return False
    ax = fig.subplots()
    for variant in variants:
        plot_seed_band(ax, variant, [r["losses"] for r in runs if r["variant"] == variant])
    ax.set(xlabel="step", ylabel="answer-token loss", title=title)
    ax.legend()
    fig.savefig(path, dpi=110)
    return True


def study_parser(description: str) -> argparse.ArgumentParser:
    """The tiny task's study options (seeds, steps, lr, batch, out) with their defaults, shared by
    this loop and the study through pyreft's trainer (pyreft_trainer.py), so both run one task."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("parity-results"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = study_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for seed in range(args.seeds):
        for variant in VARIANTS:
            run = train(variant, seed, args.steps, args.lr, args.batch)
            runs.append(run)
            last = statistics.fmean(run["losses"][-5:])
            print(f"seed {seed} {variant:16s} last-5 loss {last:.3f} "
                  f"held-out acc {run['test_accuracy']:.3f}", flush=True)  # fmt: skip
    arguments = {k: str(v) for k, v in vars(args).items()}
    results = {"task": "tiny", "torch": torch.__version__, "args": arguments, "runs": runs}
    write_record(args.out, results, summary_table(runs))
    plot(runs, args.out / "losses.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
