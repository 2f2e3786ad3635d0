"""One training loop for every adapter: same data order, batch size, optimizer and measurements."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from adapters import Adapter
from data import Example
from task import SentimentTask, last_logits
from tqdm.auto import tqdm


@dataclass
class TrainLog:
    """Per-step loss and wall time, validation accuracy as (step, accuracy) pairs, and the memory
    training needed beyond the frozen model."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    memory_mib: dict[str, float] = field(default_factory=dict)


class SavedActivationMeter:
    """Bytes of the tensors autograd saves for backward, parameters excluded.

    That is what a training step holds on top of the frozen model; on the CPU PyTorch keeps no
    allocator statistics, so this is the measure there (each storage counted once).
    """

    def __init__(self, model: torch.nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.nbytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._params and key not in self._seen:
            self._seen.add(key)
            self.nbytes += storage.nbytes()
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        self._seen.clear()
        self.nbytes = 0
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def train(
    adapter: Adapter,
    task: SentimentTask,
    examples: list[Example],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    validate: Callable[[torch.nn.Module], float] | None = None,
    validate_every: int = 50,
) -> TrainLog:
    """AdamW (no weight decay) with linear decay to 0 over all steps; returns the log.

    ``validate(model)`` (if given) runs every ``validate_every`` steps and after the last one,
    outside the timed steps.
    """
    model, device = adapter.model, next(adapter.model.parameters()).device
    optimizer = torch.optim.AdamW(adapter.params, lr=lr, weight_decay=0.0)
    if adapter.after_optimizer is not None:
        adapter.after_optimizer(optimizer)
    steps = epochs * -(-len(examples) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    order = random.Random(seed)
    meter, log = SavedActivationMeter(model), TrainLog()
    peak_activations = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_allocated = torch.cuda.memory_allocated(device)
    model.train()
    progress = tqdm(total=steps, desc=adapter.name, unit="step")
    for _ in range(epochs):
        shuffled = order.sample(examples, len(examples))
        for batch in task.batches(shuffled, batch_size):
            start = time.perf_counter()
            with meter.hooks():
                loss = task.loss(last_logits(model, batch), batch["labels"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            log.step_seconds.append(time.perf_counter() - start)
            log.losses.append(loss.item())
            peak_activations = max(peak_activations, meter.nbytes)
            step = len(log.losses)
            if validate is not None and (step % validate_every == 0 or step == steps):
                log.validation.append((step, validate(model)))
            progress.update()
            progress.set_postfix(loss=f"{log.losses[-1]:.3f}")
    progress.close()
    model.eval()
    # AdamW keeps two moments per trainable value, plus the gradient itself.
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in adapter.params)
    log.memory_mib = {
        "saved_activations_peak": peak_activations / 2**20,
        "gradients_and_optimizer_state": state_bytes / 2**20,
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base_allocated
        log.memory_mib["cuda_peak_allocated"] = peak / 2**20
    return log
