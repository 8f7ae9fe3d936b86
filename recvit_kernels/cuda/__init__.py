"""The ``cuda`` backend: the C++/CUDA extension built from ``csrc/`` (depth sort, tensor-core varlen
attention forward, residual LayerNorm, the live-row linear layer and the MLP).

The extension is the one ``pip install --no-build-isolation .`` built ahead of time
(``recvit_kernels.cuda._C``); without it, the first use JIT-builds it with
``torch.utils.cpp_extension.load`` (ninja) with the CUDA toolkit ``toolkit.find_cuda_home``
finds, cached in torch's extension directory. Where neither is possible (CPU-only torch, no GPU, a
GPU older than sm_80, no nvcc, a failed build) the backend reports itself unavailable with the
reason and ``auto`` moves on. The kernels are forward-only: a call with inputs that require grad is
declined (``supports``), as is one they have no kernel for (fp32 attention, say); ``auto``, and
``backend="cuda"`` named explicitly too (``HANDS_ON``), then take the next backend (triton, then
packed), logged with the reason.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from .._backend import register_availability
from .toolkit import find_cuda_home

logger = logging.getLogger("recvit_kernels")
SOURCES = ("binding.cpp", "depth_sort.cu", "varlen_attention.cu", "layer_norm.cu",
           "prefix_linear.cu", "linear_epilogue.cu")
HEADERS = ("recvit_kernels.h", "mma_sm80.cuh", "convert.cuh")
EXTENSION_NAME = "recvit_kernels_cuda"


def source_dir() -> Optional[Path]:
    """The kernel sources' directory: shipped inside the package, or the repository's csrc/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parents[1] / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES + HEADERS):
            return candidate
    return None


def _platform_reason() -> Optional[str]:
    """None if this torch and GPU can run the kernels, else why not."""
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (f"the kernels need compute capability 8.0 or newer (sm_80+), "
                f"this GPU has {major}.{minor}")
    return None


def _jit_build() -> ModuleType:
    """Build (or reuse torch's cached build of) the extension from the sources with ninja."""
    cuda_home, found = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError(f"the extension was not prebuilt and no CUDA toolkit was found: {found}")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(cuda_home)  # torch's guess fails where nvcc is a wrapper script
    sources = source_dir()
    if sources is None:
        raise RuntimeError("the extension was not prebuilt and the kernel sources (csrc/) "
                           "are missing")
    logger.info("recvit_kernels.cuda: JIT-building the CUDA extension from %s with the CUDA "
                "toolkit %s (from %s; once, cached)", sources, cuda_home, found)
    return cpp_extension.load(
        name=EXTENSION_NAME, sources=[str(sources / name) for name in SOURCES],
        extra_include_paths=[str(sources)], extra_cuda_cflags=["-O3"], extra_cflags=["-O3"],
        verbose=os.environ.get("RECVIT_VERBOSE_BUILD") == "1")


def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    """(extension, None), or (None, the reason the backend cannot run)."""
    reason = _platform_reason()
    if reason is not None:
        return None, reason
    try:
        from . import _C  # the ahead-of-time build
        return _C, None
    except ImportError as prebuilt_error:
        try:
            return _jit_build(), None
        except Exception as error:  # a failed build makes the backend unavailable, with the reason
            return None, (f"prebuilt extension not importable ({prebuilt_error}) and the JIT "
                          f"build failed: {error}")


@functools.lru_cache(maxsize=None)
def _cached_load() -> tuple[Optional[ModuleType], Optional[str]]:
    return _load()


def extension() -> ModuleType:
    """The loaded extension module; raises ``RuntimeError`` with the reason when unavailable."""
    module, reason = _cached_load()
    if module is None:
        raise RuntimeError(f"the cuda backend is unavailable: {reason}")
    return module


def unavailable_reason() -> Optional[str]:
    """None if the extension is loaded (building it on first call if needed), else why not."""
    return _cached_load()[1]


def grad_reason(*tensors) -> Optional[str]:
    """Why a forward-only kernel must decline these inputs, or None."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in tensors):
        return "the cuda kernels are forward-only and an input requires grad"
    return None


def device_reason(name: str, tensor: torch.Tensor) -> Optional[str]:
    if tensor.device.type != "cuda":
        return f"{name} is on {tensor.device}; the cuda kernels need a CUDA tensor"
    return None


register_availability("cuda", unavailable_reason)

# The op modules register themselves.
from . import depth_sort, layer_norm, mlp, prefix_linear, varlen_attention  # noqa: E402,F401
