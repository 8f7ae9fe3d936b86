"""LayerNorm over rows with the residual add fused in (the extension's one-warp-per-row kernel).

Same contract as :func:`recvit_kernels.layer_norm`: normalises the last dimension of ``x``; with
``residual`` returns ``(layer_norm(x + residual), x + residual)``. float32, float16 and bfloat16,
widths up to the kernel's register budget (1024); other calls are declined with the reason.
``num_rows`` is accepted and ignored: the kernel normalises every row (the contract leaves the
rows past it unspecified).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import register
from . import device_reason, extension, grad_reason

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _supports(x, weight, bias, eps, residual) -> Optional[str]:
    reason = device_reason("x", x) or grad_reason(x, weight, bias, residual)
    if reason is not None:
        return reason
    if x.dtype not in DTYPES:
        return f"x has dtype {x.dtype}; the cuda layer_norm takes {DTYPES}"
    if residual is not None and residual.dtype != x.dtype:
        return f"residual has dtype {residual.dtype}, x has {x.dtype}"
    limit = extension().max_layer_norm_width
    if x.shape[-1] > limit:
        return f"width {x.shape[-1]} exceeds the cuda layer_norm's limit of {limit}"
    return None


@register("layer_norm", "cuda", supports=_supports)
def layer_norm_cuda(x, weight, bias, eps, residual, num_rows=None):
    out, summed = extension().layer_norm(x, weight, bias, eps, residual)
    return out if residual is None else (out, summed)
