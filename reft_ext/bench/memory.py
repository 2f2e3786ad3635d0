"""Peak memory of one call, measured the same way for every provider (outside the timed loop)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` during one call of ``fn``, above those allocated before.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` before the call (the caching allocator's live tensor bytes, not its
    reserved pool). CPU: the allocation and free events that ``torch.profiler`` records with
    ``profile_memory=True``, replayed in order; the peak of their running sum. Either way the
    result ``fn`` returns counts (it is alive when ``fn`` returns) and memory freed by ``fn`` that
    was allocated before it lowers the running total, as it does on CUDA.

    On CPU only torch's allocator is seen (tensors; not e.g. the ``std::vector`` scratch of the
    CPU retraction kernel), as the profiler records it: the calling thread's allocations, where
    the benchmark's calls make theirs (autograd runs a CPU backward on that thread too).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device}")
    # Kineto prints a few lines to stderr for every profiling session (and an error about the
    # missing GPU); level 6 silences them. Read when the profiler first starts, so it must be set
    # here; setdefault keeps a level the user chose.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    # The FunctionEvent view nets each op's allocations against its frees, which hides the peak;
    # the raw "[memory]" events carry every allocation (+bytes) and free (-bytes) with a time.
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak
