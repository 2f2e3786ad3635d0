"""Build and packaging facts of reft_ext: version, registered kernels, CUDA availability."""

import os
import re

import pytest
import torch

import reft_ext

OPS = ("reft_ext::lowrank_edit_forward", "reft_ext::lowrank_edit_backward")


def test_version_is_a_version_string():
    """reft_ext.__version__ is a non-empty PEP 440-like release string."""
    assert isinstance(reft_ext.__version__, str)
    assert re.fullmatch(r"\d+\.\d+(\.\d+)*([.-]?\w+)*", reft_ext.__version__)


def test_public_api():
    """The documented names are exported."""
    for name in ("lowrank_edit", "loreft", "direft", "cuda_available", "__version__"):
        assert name in reft_ext.__all__ and hasattr(reft_ext, name)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    """Both raw ops have a CPU kernel."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


def test_cuda_available_is_bool_and_as_expected():
    """cuda_available() returns a bool, and True when the build must contain CUDA kernels.

    Set REFT_EXT_EXPECT_CUDA=1 in CUDA builds (CI) to make a silent CPU-only build fail here.
    """
    available = reft_ext.cuda_available()
    assert isinstance(available, bool)
    if os.environ.get("REFT_EXT_EXPECT_CUDA") == "1":
        assert available, "REFT_EXT_EXPECT_CUDA=1 but reft_ext was built without CUDA kernels"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_available_matches_dispatch():
    """On a GPU machine the raw op runs on CUDA exactly when cuda_available() says so."""
    h = torch.randn(4, 8, device="cuda")
    P, Q = torch.randn(2, 2, 8, device="cuda")
    b = torch.randn(2, device="cuda")
    if reft_ext.cuda_available():
        out, _ = torch.ops.reft_ext.lowrank_edit_forward(h, P, Q, b)
        assert out.is_cuda
    else:
        with pytest.raises(NotImplementedError):
            torch.ops.reft_ext.lowrank_edit_forward(h, P, Q, b)
