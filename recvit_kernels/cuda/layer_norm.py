"""LayerNorm over rows with the residual add fused in (the extension's one-warp-per-row kernel).

Same contract as :func:`recvit_kernels.layer_norm`: normalises the last dimension of ``x``; with
``residual`` returns ``(layer_norm(x + residual), x + residual)``. Statistics in fp32, the inverse
standard deviation by ``rsqrtf`` (approximate, within 2 ulp, where torch's is correctly rounded;
within the tolerance rule). float32, float16 and bfloat16, widths up to the kernel's register
budget (``MAX_WIDTH``). Weight and bias are read in their own dtype, which must be x's or float32
(both the same): no cast, no copy, so a captured CUDA graph reads the live parameters. With
``num_rows`` each warp reads the live count from the device and a row past it returns at once
(nothing read or written there). Other calls are declined with the reason, so ``auto`` (and
``backend="cuda"``) moves on. The call is the custom op ``torch.ops.recvit.layer_norm_cuda``
(forward only; opaque to ``torch.compile`` and ``torch.export``, with a fake implementation).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import call_op, register
from . import device_reason, extension, grad_reason

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 1024  # the row is held in registers (recvit::kMaxLayerNormWidth)


def _supports(x, weight, bias, eps, residual) -> Optional[str]:
    """Dtypes and width first (checkable on any device), then the devices and autograd."""
    if x.dtype not in DTYPES:
        return f"x has dtype {x.dtype}; the cuda layer_norm takes {DTYPES}"
    if residual is not None and residual.dtype != x.dtype:
        return f"residual has dtype {residual.dtype}, x has {x.dtype}"
    if weight.dtype not in (x.dtype, torch.float32):
        return (f"weight has dtype {weight.dtype}; the cuda layer_norm reads weights in x's dtype "
                f"({x.dtype}) or float32")
    if bias is not None and bias.dtype != weight.dtype:
        return f"bias has dtype {bias.dtype}, weight has {weight.dtype}"
    if x.shape[-1] > MAX_WIDTH:
        return f"width {x.shape[-1]} exceeds the cuda layer_norm's limit of {MAX_WIDTH}"
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        reason = None if tensor is None else device_reason(name, tensor)
        if reason is not None:
            return reason
    return grad_reason(x, weight, bias, residual)


@torch.library.custom_op("recvit::layer_norm_cuda", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                   residual: Optional[torch.Tensor],
                   num_rows: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """``[layer_norm(x)]``, or ``[layer_norm(x + residual), x + residual]``."""
    out, summed = extension().layer_norm(x, weight, bias, eps, residual, num_rows)
    return [out] if residual is None else [out, summed]


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, residual, num_rows):
    return [torch.empty_like(x, memory_format=torch.contiguous_format)
            for _ in range(1 if residual is None else 2)]


@register("layer_norm", "cuda", supports=_supports)
def layer_norm_cuda(x, weight, bias, eps, residual, num_rows=None):
    outputs = call_op(_layer_norm_op, x, weight, bias, eps, residual, num_rows)
    return outputs[0] if residual is None else tuple(outputs)
