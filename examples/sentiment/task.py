"""The sentiment instruction: prompt format, label tokens, scoring, loss and accuracy.

The model reads a chat-formatted instruction and answers with a label word. A prediction is the
label whose answer token is most likely at the prompt's last position (restricted choice, so
every method is scored on the same three options). The instruct model answers in capitals
zero-shot ("Positive") and in lower case once trained, so each label is scored by the better of
its lower-case token and the first token of its capitalized word.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from data import LABELS, Example
from transformers import PreTrainedTokenizer

PROMPT = (
    "<|im_start|>user\nWhat is the sentiment of this tweet? Answer with one word: negative, "
    "neutral or positive.\nTweet: {text}<|im_end|>\n<|im_start|>assistant\n"
)
MAX_TWEET_TOKENS = 64


class SentimentTask:
    """Encodes batches of :class:`Example` and turns last-position logits into predictions."""

    def __init__(self, tokenizer: PreTrainedTokenizer):
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"  # the answer is predicted at position -1 of every row

        def first_token(word: str) -> int:
            return tokenizer.encode(word, add_special_tokens=False)[0]

        # (2, 3): row 0 the trained answer tokens, row 1 the capitalized variants.
        self.label_tokens = torch.tensor(
            [[first_token(w) for w in LABELS], [first_token(w.capitalize()) for w in LABELS]]
        )

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` (B, T) int64 and ``labels`` (B,) int64."""
        tweets = [
            self.tokenizer.decode(
                self.tokenizer.encode(e.text, add_special_tokens=False)[:MAX_TWEET_TOKENS]
            )
            for e in examples
        ]
        batch = self.tokenizer(
            [PROMPT.format(text=t) for t in tweets], return_tensors="pt", padding=True
        )
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([e.label for e in examples]),
        }

    def class_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 3) label scores from (B, vocab) last-position logits."""
        log_probs = logits.float().log_softmax(-1)
        tokens = self.label_tokens.to(logits.device)
        return torch.maximum(log_probs[:, tokens[0]], log_probs[:, tokens[1]])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over the whole vocabulary, target the label's answer token."""
        targets = self.label_tokens[0].to(logits.device)[labels]
        return F.cross_entropy(logits.float(), targets)

    def batches(
        self, examples: list[Example], batch_size: int, by_length: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Encoded batches in order, or sorted by length (less padding; for evaluation)."""
        if by_length:
            examples = sorted(examples, key=lambda e: len(e.text))
        for start in range(0, len(examples), batch_size):
            yield self.encode(examples[start : start + batch_size])


def last_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, vocab) logits at the last position; the LM head runs on that position only."""
    device = next(model.parameters()).device
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        logits_to_keep=1,
    )
    return out.logits[:, -1]


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, task: SentimentTask, examples: list[Example], batch_size: int = 32
) -> float:
    """Fraction of ``examples`` whose top-scored label is the gold one."""
    was_training = model.training
    model.eval()
    correct = 0
    for batch in task.batches(examples, batch_size, by_length=True):
        scores = task.class_scores(last_logits(model, batch))
        correct += (scores.argmax(-1).cpu() == batch["labels"]).sum().item()
    model.train(was_training)
    return correct / len(examples)
