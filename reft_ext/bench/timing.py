"""Wall-clock timing done the same way for every provider: warm-up, interleaving, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Seconds per call of one provider: median, first and third quartiles, and sample count."""

    median: float
    q1: float
    q3: float
    samples: int


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(
    providers: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int = 15,
    warmup: int = 3,
    min_seconds: float = 0.0,
) -> dict[str, Timing]:
    """Time each zero-argument callable; rounds run every provider once, in turn.

    Interleaving spreads machine drift (other jobs, clock changes) over all providers alike, so
    their ratio is fairer than that of back-to-back runs. Each sample is one call, synchronized on
    CUDA.
    Rounds continue past ``repeats`` until ``min_seconds`` of samples were taken per provider.
    """
    sync = _synchronizer(device)
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in providers}
    while True:
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
        done = min(len(s) for s in samples.values()) >= repeats
        if done and min(sum(s) for s in samples.values()) >= min_seconds:
            break
    result = {}
    for name, values in samples.items():
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        result[name] = Timing(statistics.median(values), q1, q3, len(values))
    return result
