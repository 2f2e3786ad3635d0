"""Build of reft_ext: C++ ops always, CUDA ops when a CUDA toolkit and a CUDA build of torch exist.

Switches (environment variables):
  REFT_EXT_FORCE_CPU=1      build the CPU ops only.
  TORCH_CUDA_ARCH_LIST=...  CUDA architectures; default "8.0;9.0" when no GPU is visible.
  CUDA_HOME=...             CUDA toolkit root; found from `nvcc` on PATH when unset (a wrapper
                            script that execs the real nvcc is followed).
  MAX_JOBS=N                parallel compile jobs (ninja).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0"


def _toolkit_root_of(nvcc: Path) -> Path | None:
    """The toolkit root of an nvcc binary, following a wrapper script that execs another nvcc."""
    root = nvcc.resolve().parent.parent
    if any(root.glob("lib64/libcudart*")) or any(root.glob("lib/libcudart*")):
        return root
    try:
        text = nvcc.read_text(errors="ignore")
    except OSError:
        return None
    match = re.search(r"(/\S+)/bin/nvcc\b", text)
    return Path(match.group(1)) if match else None


def _find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_of(Path(nvcc))
        return str(root) if root else None
    default = Path("/usr/local/cuda")
    return str(default) if (default / "bin" / "nvcc").exists() else None


def _gpu_visible() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# torch.utils.cpp_extension reads CUDA_HOME when imported: settle it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _build_cuda() -> bool:
    if os.environ.get("REFT_EXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and _cuda_home is not None


def _extension():
    sources = ["csrc/reft_ext.cpp", "csrc/python_module.cpp"]
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp"))
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++17 or C++20).
    cxx_flags = ["-O3"]
    if not _build_cuda():
        print("reft_ext: building CPU ops only")
        return CppExtension("reft_ext._C", sources, extra_compile_args={"cxx": cxx_flags})
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not _gpu_visible():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    print(
        f"reft_ext: building CPU and CUDA ops (CUDA_HOME={_cuda_home}, "
        f"archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPU')})"
    )
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.cu"))
    nvcc_flags = ["-O3", "-lineinfo"]
    return CUDAExtension(
        "reft_ext._C",
        sources,
        define_macros=[("REFT_EXT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
