"""Triton MLP: cuBLAS GEMMs through torch, with the bias+GELU and bias+residual epilogues fused in
one Triton kernel each.

Same contract as :func:`recvit_kernels.mlp`: ``residual + fc2(gelu(fc1(x)))`` over the rows of x.
``F.linear`` without bias runs each GEMM, which rounds its product to x's dtype; ``_epilogue_kernel``
then adds the bias and applies the exact (erf) GELU, or adds the bias and the residual, in fp32 and
rounds again. Two roundings per layer, as many as the eager op's (``F.linear`` with its bias, then
GELU or the residual add) but not at the same places; a GEMM with the epilogue fused would round
once (the difference is within the tolerance rule). This choice over fused Triton GEMMs is not yet
measured on a GPU. The epilogues' backward is ``mlp_epilogue_backward.py``
(one element-wise Triton kernel for GELU's); the GEMMs differentiate through torch as usual.

The epilogue is a custom op (``torch.library.custom_op``, opaque to ``torch.compile`` and
``torch.export``): ``torch.ops.recvit.linear_epilogue_triton`` with its backward registered
(``register_autograd``; GELU's through the op ``torch.ops.recvit.linear_epilogue_backward_triton``,
the bias's and residual's are ``grad_out`` and its column sums), and
``torch.ops.recvit.linear_epilogue_triton_`` writing into ``out`` (``mutates_args``), for inference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._backend import call_op, register
from ._common import device_reason, on_device, unit_columns, unit_stride
from .mlp_epilogue_backward import epilogue_backward


# rows (the live count on the packed path) is data: specialising on it only recompiles.
@triton.jit(do_not_specialize=["rows"])
def _epilogue_kernel(Y, B, R, O, rows, cols, sy, sr, so,
                     HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    offs_r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_valid = offs_c < cols
    mask = (offs_r < rows)[:, None] & c_valid[None, :]
    y = tl.load(Y + offs_r[:, None] * sy + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + offs_c, mask=c_valid, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    if HAS_RESIDUAL:
        y = y + tl.load(R + offs_r[:, None] * sr + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(O + offs_r[:, None] * so + offs_c[None, :], y.to(O.dtype.element_ty), mask=mask)


def _launch(y, bias, residual, gelu, out=None):
    y, bias, r = unit_columns(y), unit_stride(bias), unit_columns(residual)
    out = torch.empty_like(y) if out is None else out
    rows, cols = y.shape
    block_rows, block_cols = 32, min(128, triton.next_power_of_2(cols))
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
    with on_device(y):
        _epilogue_kernel[grid](y, bias if bias is not None else y, r if r is not None else y, out,
                               rows, cols, y.stride(0), r.stride(0) if r is not None else 0, out.stride(0),
                               HAS_BIAS=bias is not None, GELU=gelu, HAS_RESIDUAL=r is not None,
                               BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    return out


@torch.library.custom_op("recvit::linear_epilogue_triton", mutates_args=())
def _epilogue_op(y: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                 gelu: bool) -> torch.Tensor:
    """``[gelu](y + bias) [+ residual]`` on a (rows, cols) GEMM output, fused in one kernel."""
    return _launch(y, bias, residual, gelu)


@_epilogue_op.register_fake
def _(y, bias, residual, gelu):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    y, bias, residual, gelu = inputs
    ctx.save_for_backward(y if gelu else None, bias)
    ctx.gelu = gelu


def _backward(ctx, grad_out):
    y, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    sums = bias is not None and needs[1]
    if ctx.gelu:
        dy, dbias = (*call_op(epilogue_backward, grad_out, y, bias, sums), None)[:2]
    else:
        dy, dbias = grad_out, grad_out.sum(0) if sums else None
    return dy if needs[0] else None, dbias, grad_out if needs[2] else None, None


_epilogue_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("recvit::linear_epilogue_triton_", mutates_args=("out",))
def _epilogue_inplace_op(y: torch.Tensor, bias: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor], gelu: bool, out: torch.Tensor) -> None:
    """The epilogue written into ``out`` in place (inference only: no autograd)."""
    _launch(y, bias, residual, gelu, out)


def _supports(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual):
    for name, tensor in (("x", x), ("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
                         ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias), ("residual", residual)):
        reason = None if tensor is None else device_reason(name, tensor)
        if reason is not None:
            return reason
        if tensor is not None and tensor.dtype != x.dtype:
            return f"{name} has dtype {tensor.dtype}, x has {x.dtype}"
    return None


@register("mlp", "triton", supports=_supports)
def mlp_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, out=None):
    """Triton-epilogue version of :func:`recvit_kernels.mlp`; with ``out`` (inference only, the
    front-end checks it) the fc2 epilogue writes there."""
    hidden = call_op(_epilogue_op, F.linear(x, fc1_weight), fc1_bias, None, True)
    product = F.linear(hidden, fc2_weight)
    if out is not None:
        call_op(_epilogue_inplace_op, product, fc2_bias, residual, False, out)
        return out
    if fc2_bias is None and residual is None:
        return product
    return call_op(_epilogue_op, product, fc2_bias, residual, False)
