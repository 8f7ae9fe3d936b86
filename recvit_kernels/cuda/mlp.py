"""The transformer MLP over rows: cuBLAS GEMMs (through torch, in the extension) with the bias +
exact-GELU and bias + residual epilogues in the extension's fused element-wise kernel. The GEMM
rounds its product to x's dtype and the epilogue, in fp32, rounds again: two roundings per layer,
as in the triton MLP (:mod:`recvit_kernels.triton.mlp`), within the tolerance rule.

Same contract as :func:`recvit_kernels.mlp`: ``residual + fc2(gelu(fc1(x)))``, x (rows, C); with
``out`` the result is written into it (it may be the residual: the epilogue reads each element
before writing it). float32, float16 and bfloat16, every tensor in x's dtype; other calls are
declined with the reason. For the row count on the device (the sync-free path) see
:mod:`recvit_kernels.cuda.prefix_linear`. The calls are the custom ops ``torch.ops.recvit.mlp_cuda``
and, with ``out``, ``mlp_cuda_`` (``mutates_args``): forward only, opaque to ``torch.compile`` and
``torch.export``, with fake implementations.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import call_op, register
from . import device_reason, extension, grad_reason

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _supports(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual) -> Optional[str]:
    """Dtypes first (checkable on any device), then the device and autograd."""
    if x.dtype not in DTYPES:
        return f"x has dtype {x.dtype}; the cuda mlp takes {DTYPES}"
    tensors = (("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight),
               ("fc2_bias", fc2_bias), ("residual", residual))
    for name, tensor in tensors:
        if tensor is not None and tensor.dtype != x.dtype:
            return f"{name} has dtype {tensor.dtype}, x has {x.dtype}"
    reason = device_reason("x", x)
    if reason is not None:
        return reason
    return grad_reason(x, *(tensor for _, tensor in tensors))


@torch.library.custom_op("recvit::mlp_cuda", mutates_args=())
def _mlp_op(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
            fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
            residual: Optional[torch.Tensor]) -> torch.Tensor:
    """A new (rows, C_out) result."""
    return extension().mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, None)


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual):
    return x.new_empty((x.shape[0], fc2_weight.shape[0]))


@torch.library.custom_op("recvit::mlp_cuda_", mutates_args=("out",))
def _mlp_inplace_op(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                    fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """The result written into ``out`` in place."""
    extension().mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, out)


@register("mlp", "cuda", supports=_supports)
def mlp_cuda(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, out=None) -> torch.Tensor:
    if out is None:
        return call_op(_mlp_op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    call_op(_mlp_inplace_op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, out)
    return out
