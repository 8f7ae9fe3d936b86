"""Triton prefix linear: a tiled GEMM that skips the row blocks past the live row count M.

Same contract as :func:`recvit_kernels.prefix_linear`. The grid is static, cdiv(R, BLOCK_M) x
cdiv(N_out, BLOCK_N) programs in grouped order (Triton's matmul tutorial); each loads M from
``num_rows``. A program whose row block starts at or past M returns at once (``ZERO_DEAD``, for the
backward's dX: after storing zeros there); the others
accumulate ``x @ weight.T`` in fp32 with ``tl.dot`` (fp32 inputs in TF32 or IEEE precision as
``torch.backends.cuda.matmul.allow_tf32`` says, as for the eager op's cuBLAS GEMM:
``_common.dot_precision``), add the bias, apply the exact (erf) GELU, add the residual, round once
and store the rows < M only. With ``out`` the live rows go into it in place (``out`` may be the
residual: each element's residual is read by the program that then overwrites it). Under autograd
with GELU it also stores GELU's input at the live rows (``STORE_PRE``); the backward is the Triton
kernels of ``prefix_linear_backward.py``, over the live rows too.

The GEMM kernel itself is in ``prefix_gemm.py`` (the backward's dX runs it too). Two custom ops
(``torch.library.custom_op``, so ``torch.compile`` and ``torch.export`` see them opaque): ``torch.ops.recvit.prefix_linear_triton`` returns a new result (and, with ``grad`` and
GELU, GELU's input as a second output) and has its backward registered (``register_autograd``),
which calls the backward kernels' op ``torch.ops.recvit.prefix_linear_backward_triton``;
``torch.ops.recvit.prefix_linear_triton_`` writes into ``out`` (``mutates_args``), for inference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import call_op, register
from ._common import device_reason, new_output, records_grad
from .prefix_gemm import launch as _launch
from .prefix_linear_backward import prefix_linear_backward


@torch.library.custom_op("recvit::prefix_linear_triton", mutates_args=())
def _prefix_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      num_rows: torch.Tensor, activation: Optional[str],
                      residual: Optional[torch.Tensor], grad: bool) -> list[torch.Tensor]:
    """``[out]``, a new (R, N_out) result, its rows past M unwritten; with ``grad`` (autograd
    records the call) zero there, and with GELU ``[out, pre]``: GELU's input (R, N_out) at the live
    rows too (its other rows unwritten), for the backward (what the eager GELU keeps, too)."""
    out = new_output((x.shape[0], weight.shape[0]), x, grad)
    if not (grad and activation == "gelu"):
        return [_launch(x, weight, bias, num_rows, activation, residual, out)]
    pre = torch.empty_like(out)
    return [_launch(x, weight, bias, num_rows, activation, residual, out, pre), pre]


@_prefix_linear_op.register_fake
def _(x, weight, bias, num_rows, activation, residual, grad):
    return [x.new_empty((x.shape[0], weight.shape[0])) for _ in range(2 if grad and activation == "gelu" else 1)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_rows, activation, residual, grad = inputs
    ctx.save_for_backward(x, weight, num_rows, output[1] if len(output) == 2 else None)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # GELU's input has no gradient: no zeros for it


def _backward(ctx, grad_outputs):
    x, weight, num_rows, pre = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_weight = needs[1] or needs[2]
    # the op returns the gradients asked for, in this order
    grads = iter(call_op(
        prefix_linear_backward, grad_outputs[0], x, weight, num_rows, pre, ctx.has_bias,
        needs_x=needs[0], needs_weight=needs_weight, needs_residual=needs[5]))
    dx = next(grads) if needs[0] else None
    dweight = next(grads) if needs_weight else None
    dbias = next(grads) if needs_weight and ctx.has_bias else None
    dresidual = next(grads) if needs[5] else None
    return (dx, dweight if needs[1] else None, dbias if needs[2] else None, None, None, dresidual, None)


_prefix_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("recvit::prefix_linear_triton_", mutates_args=("out",))
def _prefix_linear_inplace_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              num_rows: torch.Tensor, activation: Optional[str],
                              residual: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """The live rows written into ``out`` in place (inference only: no autograd)."""
    _launch(x, weight, bias, num_rows, activation, residual, out)


def _supports(x, weight, bias, num_rows, activation, residual):
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        reason = None if tensor is None else device_reason(name, tensor)
        if reason is not None:
            return reason
    return None


@register("prefix_linear", "triton", supports=_supports)
def prefix_linear_triton(x, weight, bias, num_rows, activation, residual, out=None):
    """Triton version of :func:`recvit_kernels.prefix_linear`."""
    if out is not None:  # in place: inference only (the front-end refuses it under autograd)
        call_op(_prefix_linear_inplace_op, x, weight, bias, num_rows, activation, residual, out)
        return out
    return call_op(_prefix_linear_op, x, weight, bias, num_rows, activation, residual,
                   records_grad(x, weight, bias, residual))[0]
