"""The ``triton`` backend: Triton kernels for varlen attention, LayerNorm (+residual), the MLP
epilogues and the prefix linear (a GEMM over the live rows).

Available when ``triton`` imports and either a CUDA GPU is present or ``TRITON_INTERPRET=1`` (the
interpreter runs the same kernels on CPU tensors, slowly; bf16 is not supported there). Each op
registers itself, with a ``supports`` check, in its own module, and launches its kernels through
PyTorch custom ops (``torch.ops.recvit.*_triton``, with fake implementations and, for the
out-of-place forms, registered gradients), so ``torch.compile`` and ``torch.export`` trace the
models without a graph break; eager calls that autograd does not record skip the op's dispatch
(``_backend.call_op``). The depth sort has no Triton kernel: the backend uses the PyTorch
one, which is free of host syncs.
"""
from __future__ import annotations

import os

from .._backend import register, register_availability


def _unavailable() -> "str | None":
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable: {error}"
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"


register_availability("triton", _unavailable)

if _unavailable() is None:
    from ..depth_sort import _depth_sort_eager
    from . import (layer_norm, mlp, prefix_linear,  # noqa: F401  (they register themselves)
                   varlen_attention)

    register("depth_sort", "triton")(_depth_sort_eager)
