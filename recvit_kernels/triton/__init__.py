"""The ``triton`` backend: Triton kernels for varlen attention, LayerNorm (+residual), the MLP
epilogues and the prefix linear (a GEMM over the live rows).

Available when ``triton`` imports and either a CUDA GPU is present or ``TRITON_INTERPRET=1`` (the
interpreter runs the same kernels on CPU tensors, slowly; bf16 is not supported there, and triton
before 3.7 needs numpy before 2.4 there). Each op registers itself, with a ``supports`` check, in
its own module, and launches its kernels through PyTorch custom ops (``torch.ops.recvit.*_triton``,
with fake implementations and, for the out-of-place forms, registered gradients), so
``torch.compile`` and ``torch.export`` trace the models without a graph break; eager calls that
autograd does not record skip the op's dispatch (``_backend.call_op``). The depth sort has no
Triton kernel: the backend uses the PyTorch one, which is free of host syncs.
"""
from __future__ import annotations

import os

from .._backend import register, register_availability


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _interpreter_reason(triton_version: str, numpy_version: str) -> "str | None":
    """Why the Triton interpreter cannot run our kernels with these versions, or None.

    Before 3.7 its tensors' ``__index__`` (our ``range`` bounds: a program id, a row count loaded
    from memory) calls ``int`` on a 1-element array, a TypeError from numpy 2.4 on (a
    DeprecationWarning before, which CI's triton-3.6 run silences with ``-W``)."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} fails under numpy "
                f"{numpy_version}; install numpy<2.4 (pip install 'numpy<2.4') or triton>=3.7")
    return None


def _unavailable() -> "str | None":
    try:
        import triton
    except ImportError as error:
        return f"triton is not importable: {error}"
    import numpy
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        return _interpreter_reason(triton.__version__, numpy.__version__)
    if torch.cuda.is_available():
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"


register_availability("triton", _unavailable)

if _unavailable() is None:
    from ..depth_sort import _depth_sort_eager
    from . import (layer_norm, mlp, prefix_linear,  # noqa: F401  (they register themselves)
                   varlen_attention)

    register("depth_sort", "triton")(_depth_sort_eager)
