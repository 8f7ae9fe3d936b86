"""Build script: metadata lives in pyproject.toml; this file only adds the optional CUDA extension.

The extension ``recvit_kernels.cuda._C`` is built (with ninja) only where the build environment
has a CUDA-enabled torch and nvcc, and ``RECVIT_SKIP_CUDA_BUILD`` is not ``1``. pip's default build
isolation hides the installed torch, so the CUDA build needs ``pip install --no-build-isolation .``;
a plain ``pip install .`` gives the pure-Python package, whose ``cuda`` backend JIT-builds the
extension on first use from the kernel sources shipped inside it. torch is imported here only once
its files say it is a CUDA build. Architectures: ``TORCH_CUDA_ARCH_LIST``, default "8.0;9.0+PTX".
The CUDA toolkit: ``CUDA_HOME``, else the one the nvcc on PATH belongs to (a wrapper script's
too), else /usr/local/cuda (recvit_kernels/cuda/toolkit.py); the build prints which.
"""
import importlib.util
import os
import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCES = ["binding.cpp", "depth_sort.cu", "varlen_attention.cu", "layer_norm.cu",
           "prefix_linear.cu", "linear_epilogue.cu"]
HEADERS = ["recvit_kernels.h", "mma_sm80.cuh", "convert.cuh"]


def torch_cuda_version():
    """The CUDA version torch was built with, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    if not version_file.is_file():
        return None
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", version_file.read_text(), re.M)
    return match.group(1) if match else None


def find_cuda_home():
    """(CUDA toolkit root, how it was found) or (None, why not): recvit_kernels/cuda/toolkit.py,
    loaded by its path (importing the package would import torch)."""
    spec = importlib.util.spec_from_file_location("recvit_cuda_toolkit",
                                                  ROOT / "recvit_kernels" / "cuda" / "toolkit.py")
    toolkit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toolkit)
    return toolkit.find_cuda_home()


def cuda_skip_reason():
    """None when the CUDA extension should be built here, else why not."""
    if os.environ.get("RECVIT_SKIP_CUDA_BUILD") == "1":
        return "RECVIT_SKIP_CUDA_BUILD=1"
    if importlib.util.find_spec("torch") is None:
        return "torch is not importable in the build environment (use --no-build-isolation)"
    if torch_cuda_version() is None:
        return "torch in the build environment is CPU-only"
    return None


class BuildPyWithSources(build_py):
    """Ship the kernel sources inside recvit_kernels/cuda/csrc, for the JIT build on first use."""

    def run(self):
        super().run()
        if not CSRC.is_dir():
            print("recvit: csrc/ not found; the cuda backend will have no sources to JIT-build")
            return
        target = Path(self.build_lib) / "recvit_kernels" / "cuda" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for name in SOURCES + HEADERS:
            shutil.copy2(CSRC / name, target / name)


def extension_kwargs():
    reason = cuda_skip_reason()
    cuda_home, found = (None, reason) if reason is not None else find_cuda_home()
    if cuda_home is None:
        print(f"recvit: building without the CUDA extension: {found}")
        return {}
    os.environ["CUDA_HOME"] = str(cuda_home)  # torch's guess fails where nvcc is a wrapper script
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # PTX: newer GPUs JIT it
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    extension = CUDAExtension(
        name="recvit_kernels.cuda._C",
        sources=[str(Path("csrc") / name) for name in SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    print(f"recvit: building the CUDA extension for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']} with the CUDA toolkit {cuda_home} (from {found})")
    return {"ext_modules": [extension],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


kwargs = extension_kwargs()
kwargs.setdefault("cmdclass", {})["build_py"] = BuildPyWithSources
setup(**kwargs)
