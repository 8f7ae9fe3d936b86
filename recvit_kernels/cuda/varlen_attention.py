"""Varlen attention forward on tensor cores (the extension's mma.sync kernel, sm_80+).

Same contract as :func:`recvit_kernels.varlen_attention`: q (total_q, H, D), k/v (total_k, H, D),
int32 device ``cu_seqlens_q/k``, host bounds ``max_seqlen_q/k``, optional ``q_rows``/``kv_rows``
index tables, optional used lengths ``seqused_q``/``seqused_k`` ((B,) int32, read by the kernel);
rows no segment covers are zero (with ``seqused_q``: unspecified, no fill). fp16 and bf16, head_dim
32, 64 and 128; other calls are declined with the reason (``auto`` then takes another backend).
The call is the custom op ``torch.ops.recvit.varlen_attention_cuda`` (forward only; opaque to
``torch.compile`` and ``torch.export``, with a fake implementation).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import call_op, constant_while_tracing, register
from . import device_reason, extension, grad_reason

DTYPES = (torch.float16, torch.bfloat16)


def _supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, *,
              q_rows=None, kv_rows=None, seqused_q=None, seqused_k=None) -> Optional[str]:
    reason = device_reason("q", q) or grad_reason(q, k, v)
    if reason is not None:
        return reason
    if q.dtype not in DTYPES:
        return f"q has dtype {q.dtype}; the cuda attention takes float16 and bfloat16"
    if not _supports_head_dim(q.shape[-1]):
        return f"head_dim={q.shape[-1]} is not supported by the cuda attention (built for 32, 64 and 128)"
    return None


# A fact of the build: torch.compile asks the extension at trace time and keeps the answer.
@constant_while_tracing
def _supports_head_dim(head_dim: int) -> bool:
    return extension().attention_supports_head_dim(head_dim)


@torch.library.custom_op("recvit::varlen_attention_cuda", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         softmax_scale: float, q_rows: Optional[torch.Tensor],
                         kv_rows: Optional[torch.Tensor], seqused_q: Optional[torch.Tensor],
                         seqused_k: Optional[torch.Tensor]) -> torch.Tensor:
    return extension().varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                max_seqlen_k, softmax_scale, q_rows, kv_rows,
                                                seqused_q, seqused_k)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, q_rows, kv_rows,
      seqused_q, seqused_k):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@register("varlen_attention", "cuda", supports=_supports)
def varlen_attention_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, *, q_rows=None, kv_rows=None, seqused_q=None,
                          seqused_k=None) -> torch.Tensor:
    return call_op(_varlen_attention_op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   softmax_scale, q_rows, kv_rows, seqused_q, seqused_k)
