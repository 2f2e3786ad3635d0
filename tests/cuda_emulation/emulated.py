"""The emulated CUDA ops in this process: build and load them, and route reft_ext's ops to them.

``load()`` builds the emulation library (emu_build.py; the variant from ``REFT_EXT_EMU_VARIANT``,
default ``default``) and loads it once: ``torch.ops.reft_ext_emu.<op>`` then runs the CUDA host
code and kernels of csrc/cuda on CPU tensors. ``routed()`` makes every ``reft_ext`` op that has an
emulated kernel dispatch to it for CPU tensors, so the public API (autograd Functions, modules,
retraction hooks) and the tests' float64 truths exercise the CUDA code as a third device.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .emu_build import build_library
from .rewrite import EMULATED_SUFFIX

NAMESPACE = "reft_ext"
EMULATED = NAMESPACE + EMULATED_SUFFIX


def emulated_ops() -> list[str]:
    """Names of the ops of ``reft_ext`` that the loaded emulation library implements."""
    prefix = EMULATED + "::"
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)]
    return sorted(
        n[len(prefix) :] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")
    )


def load() -> list[str]:
    """Build (cached) and load the emulation library once; returns the emulated op names."""
    if not emulated_ops():
        variant = os.environ.get("REFT_EXT_EMU_VARIANT", "default")
        torch.ops.load_library(str(build_library(variant)))
    return emulated_ops()


@contextlib.contextmanager
def routed():
    """Within the block, ``torch.ops.reft_ext.<op>`` on CPU tensors runs the emulated kernel."""
    names = load()
    library = torch.library.Library(NAMESPACE, "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name in names:
            library.impl(name, getattr(torch.ops.reft_ext_emu, name).default, "CPU")
    try:
        yield
    finally:
        library._destroy()
