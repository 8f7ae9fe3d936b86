"""Triton backward of the LayerNorm forward over the live rows (Triton's layer-norm tutorial scheme).

Given what the forward normalised, ``x`` (rows, C) (with the fused residual: the sum ``x + residual``
it returned as its second output), ``weight`` (C,), ``eps``, the gradient ``grad_y`` (rows, C) of
the normalised output, with the fused residual the gradient ``grad_summed`` (rows, C) of the sum, and
``num_rows`` (a 1-element integer tensor on x's device, or None: every row),
:func:`layer_norm_backward` returns ``[dx, sums]``: dx (rows, C) in x's dtype (with the fused
residual it is the gradient of both x and the residual), ``sums`` (2, C) fp32 the weight's and the
bias's gradients, for the caller to cast (and to drop the bias's without a bias).

One persistent kernel: a fixed number of programs (a few per SM) loops over the live row blocks,
reading M = ``num_rows[0]`` on the device. Each writes dx for its rows and accumulates its share of
dweight and dbias in fp32 registers, stored as one partial row each at the end (so every partial is
written, also by a program without live rows); one ``sum`` over the programs finishes them. The
rows >= M get a zero dx (their output rows are unspecified, constants to autograd), which is the only
work they cost. The statistics (mean, rstd) are recomputed in fp32 exactly as the forward computed
them: the backward loads the row anyway, so two row reductions replace storing 8 bytes a row in the
forward and reading them back.

``layer_norm_backward`` is the custom op ``torch.ops.recvit.layer_norm_backward_triton`` (opaque to
``torch.compile`` / ``torch.export``, fake implementation registered), without an autograd formula
of its own: the forward's registered backward calls it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import on_device, unit_columns, unit_stride

# Persistent programs per SM; the interpreter (no SMs) runs a few programs, so that some loop.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 3


# NUM_ROWS (a per-step slice) and rows are data: specialising on them only recompiles.
@triton.jit(do_not_specialize=["NUM_ROWS", "rows"])
def _layer_norm_backward_kernel(X, DY, DS, W, DX, PARTIAL, NUM_ROWS, rows, width, eps, sx, sdy, sds, sdx,
                                HAS_GRAD_SUMMED: tl.constexpr, HAS_NUM_ROWS: tl.constexpr,
                                BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    program, programs = tl.program_id(0), tl.num_programs(0)
    live = rows
    if HAS_NUM_ROWS:
        live = tl.minimum(tl.load(NUM_ROWS).to(tl.int64), rows)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < width
    w = tl.load(W + offs_c, mask=c_valid, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for first in range(program * BLOCK_ROWS, live, programs * BLOCK_ROWS):
        offs_r = (first + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        mask = (offs_r < live)[:, None] & c_valid[None, :]
        x = tl.load(X + offs_r[:, None] * sx + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / width
        centred = tl.where(c_valid[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / width + eps)
        normed = centred * rstd[:, None]
        dy = tl.load(DY + offs_r[:, None] * sdy + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        dw += tl.sum(dy * normed, 0)
        db += tl.sum(dy, 0)
        dnormed = dy * w[None, :]
        dx = (dnormed - normed * (tl.sum(dnormed * normed, 1) / width)[:, None]
              - (tl.sum(dnormed, 1) / width)[:, None]) * rstd[:, None]
        if HAS_GRAD_SUMMED:
            dx += tl.load(DS + offs_r[:, None] * sds + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs_r[:, None] * sdx + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    for first in range(live + program * BLOCK_ROWS, rows, programs * BLOCK_ROWS):
        offs_r = (first + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        mask = (offs_r < rows)[:, None] & c_valid[None, :]
        tl.store(DX + offs_r[:, None] * sdx + offs_c[None, :],
                 tl.zeros((BLOCK_ROWS, BLOCK_C), DX.dtype.element_ty), mask=mask)
    tl.store(PARTIAL + program * width + offs_c, dw, mask=c_valid)
    tl.store(PARTIAL + (programs + program) * width + offs_c, db, mask=c_valid)


def _config(width):
    """(BLOCK_ROWS, BLOCK_C, num_warps): the forward's row width, half its rows (two more row tiles
    live at once here); each compiles without a spill for sm_80 and sm_90 (tests/test_triton_compile.py)."""
    block_c = triton.next_power_of_2(width)
    return max(1, min(16, 2048 // block_c)), block_c, 4 if block_c <= 1024 else 8


def _programs(x, row_blocks):
    if x.device.type != "cuda":
        return min(row_blocks, INTERPRETER_PROGRAMS)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return min(row_blocks, PROGRAMS_PER_SM * sms)


@torch.library.custom_op("recvit::layer_norm_backward_triton", mutates_args=())
def layer_norm_backward(grad_y: torch.Tensor, grad_summed: Optional[torch.Tensor], x: torch.Tensor,
                        weight: torch.Tensor, eps: float,
                        num_rows: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """``[dx (rows, C) like x, (dweight, dbias) as one (2, C) fp32 tensor]`` of the LayerNorm of the
    rows of ``x`` (the sum, with a fused residual; ``grad_summed`` is then its gradient, else None)
    at rows < ``num_rows[0]`` (every row if None); dx is zero at the other rows."""
    grad_y, grad_summed, x = unit_columns(grad_y), unit_columns(grad_summed), unit_columns(x)
    weight = unit_stride(weight)
    rows, width = x.shape
    block_rows, block_c, num_warps = _config(width)
    programs = max(1, _programs(x, triton.cdiv(rows, block_rows)))
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    partial = torch.empty((2, programs, width), dtype=torch.float32, device=x.device)
    ds = grad_summed if grad_summed is not None else grad_y
    with on_device(x):
        _layer_norm_backward_kernel[(programs,)](
            x, grad_y, ds, weight, dx, partial, num_rows if num_rows is not None else weight, rows, width,
            eps, x.stride(0), grad_y.stride(0), ds.stride(0), dx.stride(0),
            HAS_GRAD_SUMMED=grad_summed is not None, HAS_NUM_ROWS=num_rows is not None,
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)
    return [dx, partial.sum(1)]


@layer_norm_backward.register_fake
def _(grad_y, grad_summed, x, weight, eps, num_rows=None):
    return [torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((2, x.shape[1]), dtype=torch.float32)]
