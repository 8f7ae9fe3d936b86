"""Shared pieces of the triton backend: where a tensor can run, and how the attention kernels
(forward and backward) read their segments."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: the fp32 policy of every Triton GEMM and attention here.

    fp32 follows torch: ``torch.backends.cuda.matmul.allow_tf32`` (what
    ``torch.set_float32_matmul_precision("high")`` sets) gives TF32 tensor cores, as cuBLAS gives
    ``F.linear``; torch's default (False) gives IEEE fp32 on the FMA units, no tensor cores, the
    same rounding as the eager op. Read at every launch. 16-bit inputs always use the tensor cores
    (the value is then ignored).
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def device_reason(name: str, tensor: torch.Tensor) -> Optional[str]:
    """None if the Triton kernels can read ``tensor`` (its device and dtype), else why not."""
    if tensor.device.type == "cpu" and not interpreting():
        return f"{name} is on the CPU; Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)"
    if tensor.device.type not in ("cpu", "cuda"):
        return f"{name} is on {tensor.device}; Triton kernels need a CUDA tensor"
    if tensor.dtype not in DTYPES:
        return f"{name} has dtype {tensor.dtype}; the Triton kernels take {DTYPES}"
    if tensor.dtype == torch.bfloat16 and interpreting():
        return f"{name} is bfloat16, which the Triton interpreter does not support"
    return None


def unit_stride(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``tensor`` (or None) as the kernels read a 1-D argument (a bias, a LayerNorm weight, a
    length or index table): with unit stride. A copy only for a strided view (``bias[::2]``, a
    column of a table); a contiguous tensor, whatever its storage offset, is returned as it is."""
    return None if tensor is None else tensor.contiguous()


def unit_columns(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``tensor`` (or None) as the element-wise and LayerNorm kernels read a (rows, C) argument: any
    row stride, unit column stride (a copy only where the columns are strided)."""
    return tensor if tensor is None or tensor.stride(-1) == 1 else tensor.contiguous()


def on_device(tensor: torch.Tensor):
    """The context every Triton launch on ``tensor`` runs in: Triton launches on the *current* CUDA
    device (and its current stream), so ``tensor``'s device is made current for the launch
    (``torch.cuda.device``: no device switch when it already is). Nothing for the interpreter's
    CPU tensors."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def records_grad(*inputs) -> bool:
    """Whether autograd records an op on ``inputs`` (call it outside ``Function.forward``)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in inputs)


def new_output(shape, like: torch.Tensor, zero: bool) -> torch.Tensor:
    """An output buffer for a kernel that leaves some rows unwritten: uninitialised for inference,
    zero (``zero``, when autograd records the op). The triton backwards read the live rows only, but
    an op that fell back to the eager backend differentiates every row, and the garbage of an
    unwritten row times a zero gradient can still be NaN (a memset per op: training only)."""
    return (torch.zeros if zero else torch.empty)(shape, dtype=like.dtype, device=like.device)


LOG2E = 1.4426950408889634
# The attention kernels' length and index tables are slices of per-step tensors (their 16-byte
# alignment alternates step to step) read at data-dependent offsets, and the bounds change per step
# on the packed path: specialising on them only recompiles (``do_not_specialize``).
ATTENTION_TABLES = ["CU_Q", "CU_K", "Q_ROWS", "KV_ROWS", "USED_Q", "USED_K", "max_seqlen_q", "max_seqlen_k"]


@triton.jit
def segment_bounds(CU, USED, segment, max_seqlen, HAS_USED: tl.constexpr):
    """(start, length) of ``segment``: its used length if ``HAS_USED``, else its own, clamped to
    ``max_seqlen`` (flash-attention's convention)."""
    start = tl.load(CU + segment)
    if HAS_USED:
        length = tl.load(USED + segment)
    else:
        length = tl.load(CU + segment + 1) - start
    return start, tl.minimum(length, max_seqlen)


@triton.jit
def segment_rows(ROWS, start, offs, valid, HAS_ROWS: tl.constexpr):
    """Tensor row (int64) of each segment position ``start + offs``, through the table if any."""
    if HAS_ROWS:
        return tl.load(ROWS + start + offs, mask=valid, other=0).to(tl.int64)
    return (start + offs).to(tl.int64)


@triton.jit
def head_tile(P, rows, head, stride_row, stride_head, stride_dim, offs_d):
    """Pointers (len(rows), HEAD_DIM) to head ``head``'s vectors in the tensor rows ``rows``."""
    return P + rows[:, None] * stride_row + head * stride_head + offs_d[None, :] * stride_dim
