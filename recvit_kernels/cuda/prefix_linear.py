"""Linear layer on the live row prefix (the extension's mma.sync GEMM, sm_80+).

Same contract as :func:`recvit_kernels.prefix_linear`: ``act(x @ weight.T + bias) [+ residual]`` on
the rows ``r < num_rows[0]`` of x (R, K), the count read on the device (no host sync, CUDA-graph
capture). The rows past the count are neither read nor written: the row blocks past it return at
once, so the cost follows the live rows. With ``out`` (R, N_out) the live rows are written into it
in place (it may be the residual) and its other rows keep their values; without it the other rows
of the new result are unspecified (uninitialised memory). float16 and bfloat16 with K a multiple
of 8; other calls are declined with the reason. The calls are the custom ops
``torch.ops.recvit.prefix_linear_cuda`` and, with ``out``, ``prefix_linear_cuda_`` (``mutates_args``):
forward only, opaque to ``torch.compile`` and ``torch.export``, with fake implementations.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import call_op, register
from . import device_reason, extension, grad_reason

DTYPES = (torch.float16, torch.bfloat16)
K_MULTIPLE = 8  # the kernel copies K in 16-byte chunks (recvit::kPrefixLinearKMultiple)
MAX_ROWS = 65535 * 128  # the grid's y extent (recvit::kMaxPrefixLinearRows)


def _supports(x, weight, bias, num_rows, activation, residual) -> Optional[str]:
    """Dtype and shape first (checkable on any device), then the device and autograd."""
    if x.dtype not in DTYPES:
        return f"x has dtype {x.dtype}; the cuda prefix_linear takes float16 and bfloat16"
    if x.shape[1] % K_MULTIPLE:
        return (f"in_features={x.shape[1]} is not a multiple of {K_MULTIPLE}, "
                f"as the cuda prefix_linear needs")
    if x.shape[0] > MAX_ROWS:
        return f"{x.shape[0]} rows exceed the cuda prefix_linear's limit of {MAX_ROWS}"
    for name, tensor in (("x", x), ("weight", weight), ("num_rows", num_rows)):
        reason = device_reason(name, tensor)
        if reason is not None:
            return reason
    return grad_reason(x, weight, bias, residual)


@torch.library.custom_op("recvit::prefix_linear_cuda", mutates_args=())
def _prefix_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      num_rows: torch.Tensor, gelu: bool,
                      residual: Optional[torch.Tensor]) -> torch.Tensor:
    """A new (R, N_out) result, its rows past the count unspecified."""
    return extension().prefix_linear(x, weight, bias, num_rows, gelu, residual, None)


@_prefix_linear_op.register_fake
def _(x, weight, bias, num_rows, gelu, residual):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("recvit::prefix_linear_cuda_", mutates_args=("out",))
def _prefix_linear_inplace_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              num_rows: torch.Tensor, gelu: bool, residual: Optional[torch.Tensor],
                              out: torch.Tensor) -> None:
    """The live rows written into ``out`` in place."""
    extension().prefix_linear(x, weight, bias, num_rows, gelu, residual, out)


@register("prefix_linear", "cuda", supports=_supports)
def prefix_linear_cuda(x, weight, bias, num_rows, activation, residual, out=None) -> torch.Tensor:
    if out is None:
        return call_op(_prefix_linear_op, x, weight, bias, num_rows, activation == "gelu", residual)
    call_op(_prefix_linear_inplace_op, x, weight, bias, num_rows, activation == "gelu", residual, out)
    return out
