"""What a measurement ran on: recorded with every benchmark and demo result."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor()


def machine_info(device: torch.device) -> dict:
    """Date (UTC), device, GPU name (None on CPU), CPU model and count, the CPU kernels' build
    (:func:`reft_ext.cpu_kernels`), torch threads, and the torch, CUDA and Python versions."""
    from ..ops import cpu_kernels

    device = torch.device(device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_kernels": cpu_kernels(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
