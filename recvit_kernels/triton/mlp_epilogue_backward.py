"""Triton backward of the MLP's fused epilogue ``[gelu](y + bias) [+ residual]`` (``mlp.py``).

Given the GEMM output ``y`` (rows, cols) the forward read, ``bias`` (cols,) or None, ``gelu`` and the
output gradient ``grad_out`` (rows, cols), :func:`epilogue_backward` returns ``(dy, dbias)``: dy
(rows, cols) like y, ``grad_out * gelu'(y + bias)`` with exact (erf) GELU, else ``grad_out`` itself;
dbias (cols,) in bias's dtype, the column sums of dy (None without bias or unless ``needs_bias``).
The residual's gradient is ``grad_out`` (the caller's).

With GELU one element-wise kernel writes dy and each program's fp32 column sums of its tile
(``_epilogue_backward_kernel``); one ``sum`` over the row blocks finishes dbias. Without GELU dbias
is ``grad_out.sum(0)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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


def epilogue_backward(grad_out, y, bias, gelu, needs_bias=True):
    """(dy (rows, cols) like y, dbias (cols,) or None) of ``[gelu](y + bias)`` for ``grad_out``."""
    sums = bias is not None and needs_bias
    if not gelu:
        return grad_out, grad_out.sum(0) if sums else None
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    rows, cols = y.shape
    block_cols = min(128, triton.next_power_of_2(cols))
    row_blocks = triton.cdiv(rows, BLOCK_ROWS)
    dy = torch.empty_like(y, memory_format=torch.contiguous_format)
    partial = torch.empty((row_blocks, cols), dtype=torch.float32, device=y.device) if sums else dy
    if dy.numel():
        _epilogue_backward_kernel[(row_blocks, triton.cdiv(cols, block_cols))](
            grad_out, y, bias if bias is not None else y, dy, partial, rows, cols, grad_out.stride(0),
            y.stride(0), dy.stride(0), HAS_BIAS=bias is not None, SUMS=sums, BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_COLS=block_cols)
    if not sums:
        return dy, None
    return dy, partial.sum(0).to(bias.dtype)
