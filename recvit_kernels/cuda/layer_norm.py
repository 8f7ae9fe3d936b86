"""LayerNorm over rows with the residual add fused in (the extension's one-warp-per-row kernel).

Same contract as :func:`recvit_kernels.layer_norm`: normalises the last dimension of ``x``; with
``residual`` returns ``(layer_norm(x + residual), x + residual)``. float32, float16 and bfloat16,
widths up to the kernel's register budget (1024); other calls are declined with the reason.
``num_rows`` is accepted and ignored: the kernel normalises every row (the contract leaves the
rows past it unspecified). The kernel reads weight and bias in fp32: a half-precision model's are
cast once and the copies kept (``fp32_copy``), not cast on every call (two launches per call,
48 per bf16 Edge-RecViT forward).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .._backend import register
from . import device_reason, extension, grad_reason

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP32_COPIES: dict = {}  # id(tensor) -> (weak reference, (version, data_ptr, dtype), fp32 copy)


def fp32_copy(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``tensor`` as a contiguous fp32 tensor, cast once and kept while the tensor lives.

    The copy is made again when the tensor changes: in place (its version counter) or by a new
    storage (``module.half()``). A CUDA graph captured with a copy reads that copy: capture again
    after changing the weights (as for any weight the graph does not read directly).
    """
    if tensor is None or (tensor.dtype == torch.float32 and tensor.is_contiguous()):
        return tensor
    key = (tensor._version, tensor.data_ptr(), tensor.dtype)
    cached = _FP32_COPIES.get(id(tensor))
    if cached is None or cached[0]() is not tensor:  # (a tensor's weak key compares by value)
        weakref.finalize(tensor, _FP32_COPIES.pop, id(tensor), None)
        cached = None
    if cached is None or cached[1] != key:
        cached = (weakref.ref(tensor), key, tensor.detach().to(torch.float32).contiguous())
        _FP32_COPIES[id(tensor)] = cached
    return cached[2]


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
    out, summed = extension().layer_norm(x, fp32_copy(weight), fp32_copy(bias), eps, residual)
    return out if residual is None else (out, summed)
