"""Triton backward of the MLP's fused epilogue ``gelu(y + bias)`` (``mlp.py``).

Given the GEMM output ``y`` (rows, cols) the forward read, ``bias`` (cols,) or None and the output
gradient ``grad_out`` (rows, cols), :func:`epilogue_backward` returns ``[dy]``, or ``[dy, dbias]``
with ``needs_bias``: dy (rows, cols) like y, ``grad_out * gelu'(y + bias)`` with exact (erf) GELU;
dbias (cols,) in bias's dtype, the column sums of dy. The epilogue without GELU needs no kernel:
its gradients are ``grad_out`` and its column sums (the caller's).

One element-wise kernel writes dy and each program's fp32 column sums of its tile
(``_epilogue_backward_kernel``); one ``sum`` over the row blocks finishes dbias.

``epilogue_backward`` is the custom op ``torch.ops.recvit.linear_epilogue_backward_triton`` (opaque
to ``torch.compile`` / ``torch.export``, fake implementation registered), without an autograd
formula of its own: the forward's registered backward calls it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import on_device, unit_columns, unit_stride

BLOCK_ROWS = 32


# rows (the live count on the packed path) is data: specialising on it only recompiles.
@triton.jit(do_not_specialize=["rows"])
def _epilogue_backward_kernel(G, Y, B, DY, PARTIAL, rows, cols, sg, sy, sdy,
                              HAS_BIAS: tl.constexpr, SUMS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                              BLOCK_COLS: tl.constexpr):
    offs_r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_valid = offs_c < cols
    mask = (offs_r < rows)[:, None] & c_valid[None, :]
    pre = tl.load(Y + offs_r[:, None] * sy + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre = pre + tl.load(B + offs_c, mask=c_valid, other=0.0).to(tl.float32)[None, :]
    g = tl.load(G + offs_r[:, None] * sg + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
    pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327
    dy = (g * (cdf + pre * pdf)).to(DY.dtype.element_ty)
    tl.store(DY + offs_r[:, None] * sdy + offs_c[None, :], dy, mask=mask)
    if SUMS:  # the column sums of the rounded dy, as the eager bias gradient sums it
        tl.store(PARTIAL + tl.program_id(0) * cols + offs_c, tl.sum(dy.to(tl.float32), 0), mask=c_valid)


@torch.library.custom_op("recvit::linear_epilogue_backward_triton", mutates_args=())
def epilogue_backward(grad_out: torch.Tensor, y: torch.Tensor, bias: Optional[torch.Tensor],
                      needs_bias: bool = True) -> list[torch.Tensor]:
    """``[dy (rows, cols) like y]`` of ``gelu(y + bias)`` for ``grad_out``, and dbias (cols,) too
    with ``needs_bias`` (and a bias)."""
    sums = bias is not None and needs_bias
    grad_out, y, bias = unit_columns(grad_out), unit_columns(y), unit_stride(bias)
    rows, cols = y.shape
    block_cols = min(128, triton.next_power_of_2(cols))
    row_blocks = triton.cdiv(rows, BLOCK_ROWS)
    dy = torch.empty_like(y, memory_format=torch.contiguous_format)
    partial = torch.empty((row_blocks, cols), dtype=torch.float32, device=y.device) if sums else dy
    if dy.numel():
        with on_device(y):
            _epilogue_backward_kernel[(row_blocks, triton.cdiv(cols, block_cols))](
                grad_out, y, bias if bias is not None else y, dy, partial, rows, cols, grad_out.stride(0),
                y.stride(0), dy.stride(0), HAS_BIAS=bias is not None, SUMS=sums, BLOCK_ROWS=BLOCK_ROWS,
                BLOCK_COLS=block_cols)
    return [dy, partial.sum(0).to(bias.dtype)] if sums else [dy]


@epilogue_backward.register_fake
def _(grad_out, y, bias, needs_bias=True):
    dy = torch.empty_like(y, memory_format=torch.contiguous_format)
    return [dy, bias.new_empty(bias.shape)] if bias is not None and needs_bias else [dy]
