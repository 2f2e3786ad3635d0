"""Shared fixtures for the reft_ext tests: seeding, the device list and random inputs."""

import math

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def pytest_generate_tests(metafunc):
    """Run every test that takes a ``device`` argument once per entry of DEVICES."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)


def random_inputs(shape, r, dtype, param_dtype=None, device="cpu", requires_grad=True, d=None):
    """Random ``(h, A, B, b)`` for the edits: h of ``shape``, A and B (r, d), b (r,).

    ``param_dtype`` is one dtype for all three parameters or a tuple of three (default: h's dtype).
    ``d`` defaults to ``shape[-1]`` (pass it when h is a view of a tensor of another shape). A and B
    are scaled by 1/sqrt(d) so the edit stays of the order of h for any d.
    """
    if param_dtype is None or isinstance(param_dtype, torch.dtype):
        param_dtype = (param_dtype or dtype,) * 3
    d = shape[-1] if d is None else d
    scale = 1.0 / math.sqrt(max(d, 1))
    h = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    A = (torch.randn(r, d, dtype=torch.float64) * scale).to(device, param_dtype[0])
    B = (torch.randn(r, d, dtype=torch.float64) * scale).to(device, param_dtype[1])
    b = torch.randn(r, dtype=torch.float64).to(device, param_dtype[2])
    tensors = (h, A, B, b)
    if requires_grad:
        for t in tensors:
            t.requires_grad_()
    return tensors


@pytest.fixture
def make_inputs():
    """The :func:`random_inputs` factory."""
    return random_inputs
