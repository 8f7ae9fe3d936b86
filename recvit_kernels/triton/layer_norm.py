"""Triton LayerNorm over rows, with the residual add fused (``(layer_norm(x + r), x + r)``).

Same contract as :func:`recvit_kernels.layer_norm`: ``x`` (..., C) normalised over C with
``weight`` (C,) and optional ``bias`` (C,); statistics in fp32. One program normalises BLOCK_ROWS
rows. The means and ``rstd = 1 / sqrt(var + eps)`` use Triton's default division and square root,
which on NVIDIA GPUs are approximate (``div.full.f32``, ``sqrt.approx.ftz.f32``: a few ulp, where
torch's are correctly rounded); the difference is within the tolerance rule. The sum
``x + residual`` is rounded to x's dtype before it is normalised, as in the eager op. With
``num_rows`` each program reads the live count from the device and a row block past it returns at
once (nothing read or written there). The backward is the Triton kernel of
``layer_norm_backward.py``, over the live rows too.

The launch is the custom op ``torch.ops.recvit.layer_norm_triton`` (``torch.library.custom_op``)
with a fake implementation and its backward registered (``register_autograd``), so
``torch.compile`` and ``torch.export`` see one opaque op; the backward calls the backward kernel's
op ``torch.ops.recvit.layer_norm_backward_triton``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._backend import call_op, register
from ._common import device_reason, new_output, on_device, records_grad, unit_columns, unit_stride
from .layer_norm_backward import layer_norm_backward

MAX_WIDTH = 8192


# NUM_ROWS (a per-step slice: its 16-byte alignment alternates step to step) and rows (the live
# count on the packed path) are data: specialising on them only recompiles.
@triton.jit(do_not_specialize=["NUM_ROWS", "rows"])
def _layer_norm_kernel(X, R, W, B, Y, S, NUM_ROWS, rows, width, eps, sx, sr, sy, ss,
                       HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NUM_ROWS: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    first = tl.program_id(0) * BLOCK_ROWS
    if HAS_NUM_ROWS:
        rows = tl.minimum(tl.load(NUM_ROWS).to(tl.int64), rows)
        if first >= rows:
            return
    offs_r = (first + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < width
    mask = (offs_r < rows)[:, None] & c_valid[None, :]
    x = tl.load(X + offs_r[:, None] * sx + offs_c[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(R + offs_r[:, None] * sr + offs_c[None, :], mask=mask, other=0.0)
        tl.store(S + offs_r[:, None] * ss + offs_c[None, :], x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, 1) / width
    centred = tl.where(c_valid[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / width + eps)
    y = centred * rstd[:, None] * tl.load(W + offs_c, mask=c_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + offs_c, mask=c_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_r[:, None] * sy + offs_c[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _rows(t):
    return unit_columns(t.reshape(-1, t.shape[-1]))


def _launch(x, weight, bias, eps, residual, num_rows, zero):
    width = x.shape[-1]
    weight, bias = unit_stride(weight), unit_stride(bias)
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    if num_rows is None:
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        summed = torch.empty_like(out) if residual is not None else out
    else:  # rows past num_rows stay unwritten
        out = new_output(x2.shape, x, zero)
        summed = new_output(x2.shape, x, zero) if residual is not None else out
    block_c = triton.next_power_of_2(width)
    block_rows = max(1, min(16, 4096 // block_c))
    grid = (triton.cdiv(x2.shape[0], block_rows),)
    with on_device(x):
        _layer_norm_kernel[grid](x2, r2, weight, bias if bias is not None else weight, out, summed,
                                 num_rows if num_rows is not None else weight, x2.shape[0], width, eps,
                                 x2.stride(0), r2.stride(0), out.stride(0), summed.stride(0),
                                 HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
                                 HAS_NUM_ROWS=num_rows is not None, BLOCK_ROWS=block_rows,
                                 BLOCK_C=block_c, num_warps=4 if block_c <= 1024 else 8)
    return out.view(x.shape), summed.view(x.shape)


@torch.library.custom_op("recvit::layer_norm_triton", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                   residual: Optional[torch.Tensor], num_rows: Optional[torch.Tensor],
                   zero: bool) -> list[torch.Tensor]:
    """``[layer_norm(x)]``, or ``[layer_norm(x + residual), x + residual]`` (the kernel launch)."""
    out, summed = _launch(x, weight, bias, eps, residual, num_rows, zero)
    return [out] if residual is None else [out, summed]


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, residual, num_rows, zero):
    return [torch.empty_like(x, memory_format=torch.contiguous_format)
            for _ in range(1 if residual is None else 2)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual, num_rows, zero = inputs
    # what was normalised: x, or the sum x + residual (the second output)
    ctx.save_for_backward(x if residual is None else output[1], weight, bias, num_rows)
    ctx.eps = eps


def _backward(ctx, grad_outputs):
    normalised, weight, bias, num_rows = ctx.saved_tensors
    grad_y, grad_summed = (*grad_outputs, None)[:2]
    dx, sums = call_op(layer_norm_backward, _rows(grad_y),
                       None if grad_summed is None else _rows(grad_summed), _rows(normalised), weight,
                       ctx.eps, num_rows)
    needs = ctx.needs_input_grad
    dx = dx.view(normalised.shape)
    return (dx if needs[0] else None, sums[0].to(weight.dtype) if needs[1] else None,
            sums[1].to(bias.dtype) if needs[2] else None, None, dx if needs[4] else None, None, None)


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _supports(x, weight, bias, eps, residual):
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        reason = None if tensor is None else device_reason(name, tensor)
        if reason is not None:
            return reason
    if residual is not None and residual.dtype != x.dtype:
        return f"residual has dtype {residual.dtype}, x has {x.dtype}"
    if x.shape[-1] > MAX_WIDTH:
        return f"width {x.shape[-1]} exceeds {MAX_WIDTH}"
    return None


@register("layer_norm", "triton", supports=_supports)
def layer_norm_triton(x, weight, bias, eps, residual, num_rows=None):
    """Triton forward and backward of :func:`recvit_kernels.layer_norm`."""
    outputs = call_op(_layer_norm_op, x, weight, bias, eps, residual, num_rows,
                      records_grad(x, weight, bias, residual))
    return outputs[0] if residual is None else tuple(outputs)
