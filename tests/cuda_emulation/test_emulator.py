"""The CUDA emulator itself: the rewrite's handling of sources, the warp and block intrinsics'
results against CUDA's documented semantics, and the faults it must report, on probe kernels
(probes/csrc) built like the project's own."""

import random
from pathlib import Path

import pytest
import torch

from .emu_build import build_library
from .rewrite import RewriteError, rewrite_cuda

PROBES = Path(__file__).parent / "probes" / "csrc"


@pytest.fixture(scope="module")
def probe():
    if not hasattr(torch.ops.cuda_emu_probe_emu, "fault"):
        torch.ops.load_library(str(build_library("default", PROBES)))
    return torch.ops.cuda_emu_probe_emu


def _expected_source(kind, lane, arg, width):
    """CUDA's source lane (PTX shfl.sync modes idx, bfly, down, up) within a warp."""
    base = lane & ~(width - 1)
    if kind == 0:
        return base + (arg & (width - 1))
    if kind == 1:
        src = lane ^ arg
        return lane if src > base + width - 1 else src
    if kind == 2:
        return lane if lane + arg > base + width - 1 else lane + arg
    return lane if lane - arg < base else lane - arg


@pytest.mark.parametrize("width", [32, 16, 4])
@pytest.mark.parametrize("kind", [0, 1, 2, 3], ids=["idx", "xor", "down", "up"])
def test_shuffles_match_cuda_semantics(probe, kind, width):
    threads = 64
    x = torch.arange(100, 100 + threads, dtype=torch.int32)
    rng = random.Random(kind * 100 + width)
    arg = torch.tensor([rng.randrange(0, 32) for _ in range(threads)], dtype=torch.int32)
    out = probe.shuffle(x, kind, arg, width)
    for t in range(threads):
        warp, lane = divmod(t, 32)
        src = _expected_source(kind, lane, int(arg[t]), width)
        assert int(out[t]) == 100 + warp * 32 + src, (t, int(arg[t]))


def test_votes_and_counting_barriers(probe):
    predicate = torch.randint(0, 2, (96,), dtype=torch.int32)
    out = probe.votes(predicate).view(4, 96)
    for t in range(96):
        warp = predicate[t // 32 * 32 : t // 32 * 32 + 32]
        ballot = sum(int(p) << i for i, p in enumerate(warp))
        assert int(out[0, t]) & 0xFFFFFFFF == ballot
    assert (out[1] == int(predicate.sum())).all()
    assert (out[2] == int(predicate.all())).all() and (out[3] == int(predicate.any())).all()


FAULTS = {
    "too-many-threads": "1025 threads per block, more than 1024",
    "empty-grid": "has a zero dimension",
    "divergent-barrier": "__syncthreads reached at different call sites",
    "mask-without-caller": "does not include the calling lane",
    "exited-lane": "exited while lane 0 waits for it at __shfl_sync",
    "large-shared": "bytes of shared memory",
    "shared-overflow": "out-of-bounds write around the 128-byte __shared__",
    "write-past-buffer": "out-of-bounds write at byte 0 past the end of a 4092-byte buffer",
    "unchecked-launch": "was not followed by C10_CUDA_KERNEL_LAUNCH_CHECK()",
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_faults_are_reported_with_the_kernel_and_line(probe, name):
    with pytest.raises(RuntimeError, match="probes.cu:[0-9]+") as error:
        probe.fault(torch.empty(1, dtype=torch.int32), name)
    assert FAULTS[name] in str(error.value)
    # The emulator is usable again after a fault.
    x = torch.arange(32, dtype=torch.int32)
    assert torch.equal(probe.shuffle(x, 0, torch.zeros(32, dtype=torch.int32), 32), x * 0)


def test_launch_rewrite_keeps_lines_and_names_the_kernel():
    source = "void f() {\n  k<float, 4>\n      <<<grid, 256, 0, s>>>(a,\n  b);\n  next();\n}\n"
    out = rewrite_cuda(source, "/x/k.cu")
    assert out.startswith('#line 1 "/x/k.cu"\n')
    assert out.count("\n") == source.count("\n") + 1
    assert 'LaunchSite{"k<float, 4>", __FILE__, __LINE__}, grid, 256, 0, s, &k<float, 4>, a,' in out
    assert out.splitlines()[5] == "  next();"  # line 5 of the source, after the #line


def test_launch_rewrite_fills_default_shared_memory_and_stream():
    out = rewrite_cuda("void f() { k<<<g, b>>>(); }", "k.cu")
    assert "g, b, 0, cudaStream_t{}, &k)" in out


def test_shared_declarations():
    out = rewrite_cuda(
        "__global__ void k() {\n  __shared__ float a[8][4];\n  __shared__ int ok;\n"
        "  extern __shared__ unsigned char dyn[];\n}\n",
        "/x/s.cu",
    )
    assert 'auto& a = ::cuda_emu::block_shared<float [8][4]>("s.cu:2 a");' in out
    assert 'auto& ok = ::cuda_emu::block_shared<int>("s.cu:3 ok");' in out
    assert (
        'unsigned char* const dyn = ::cuda_emu::dynamic_shared<unsigned char>("s.cu:4 dyn");' in out
    )


def test_comments_and_strings_are_not_rewritten():
    source = '// k<<<1, 2>>>(x) and __shared__ int a;\nconst char* s = "__constant__ <<<";\n'
    assert rewrite_cuda(source, "c.cu").endswith(source)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            "int x;\n__constant__ float c[4];\n",
            "c.cu:2: unsupported in the CUDA emulation: __constant__",
        ),
        (
            'void f() {\n\n  asm volatile("bar.sync 0;");\n}',
            "c.cu:3: unsupported in the CUDA emulation: inline PTX",
        ),
        (
            "void k() {\n  __shared__ int a, b;\n}",
            "c.cu:2: __shared__ declaration of several variables",
        ),
        (
            "void k() {\n  __shared__ int a = 0;\n}",
            "c.cu:2: __shared__ declaration with an initializer",
        ),
        ("void f() {\n  k<<<1>>>(x);\n}", "c.cu:2: kernel launch with 1 configuration values"),
        (
            "TORCH_LIBRARY_IMPL(ns, Autograd, m) {}",
            "c.cu:1: TORCH_LIBRARY_IMPL for dispatch key Autograd",
        ),
    ],
)
def test_unsupported_constructs_fail_with_file_and_line(code, message):
    with pytest.raises(RewriteError, match=message.replace("(", r"\(")):
        rewrite_cuda(code, "c.cu")


def test_unsupported_construct_fails_the_build(tmp_path):
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "bad.cu").write_text(
        "__global__ void k() {}\n__constant__ int table[4];\n"
    )
    with pytest.raises(RewriteError, match=r"bad.cu:2: unsupported in the CUDA emulation"):
        build_library("default", tmp_path, cache=tmp_path / "cache")
