"""Shared fixtures for the reft_ext tests: seeding, the device list and random inputs."""

import math

import pytest
import torch

# "cuda_emulated": CPU tensors, with reft_ext's ops routed to csrc/cuda run by the CUDA emulator
# (tests/cuda_emulation), so every device test also checks the CUDA kernels without a GPU.
EMULATED = pytest.param("cpu", id="cuda_emulated", marks=pytest.mark.cuda_emulated)
DEVICES = [
    "cpu",
    EMULATED,
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda_emulated: run reft_ext's ops through the emulated CUDA kernels"
    )
    config.addinivalue_line(
        "markers",
        "not_emulated: a device test too long for the emulator (long training loops); it runs on "
        "cpu and cuda only",
    )


def pytest_generate_tests(metafunc):
    """Run every test that takes a ``device`` argument once per entry of DEVICES (tests marked
    not_emulated leave out the emulated entry)."""
    if "device" in metafunc.fixturenames:
        emulated = metafunc.definition.get_closest_marker("not_emulated") is None
        metafunc.parametrize("device", [d for d in DEVICES if emulated or d is not EMULATED])


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """Tests marked cuda_emulated run with reft_ext's ops routed to the emulated CUDA kernels."""
    if request.node.get_closest_marker("cuda_emulated") is None:
        yield
        return
    from cuda_emulation import emulated

    with emulated.routed():
        yield


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


def pytest_terminal_summary(terminalreporter):
    """The fuzz suite's tally (tests/fuzz/fuzzing.py), when it ran."""
    import sys

    fuzzing = sys.modules.get("fuzzing")
    if fuzzing is not None and fuzzing.TALLY:
        terminalreporter.write_sep("-", "fuzz suite: cases per category and outcome")
        terminalreporter.write_line(fuzzing.write_report())
