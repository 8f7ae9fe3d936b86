"""Varlen attention forward on tensor cores (the extension's mma.sync kernel, sm_80+).

Same contract as :func:`recvit_kernels.varlen_attention`: q (total_q, H, D), k/v (total_k, H, D),
int32 device ``cu_seqlens_q/k``, host bounds ``max_seqlen_q/k``, optional ``q_rows``/``kv_rows``
index tables; rows no segment covers are zero. fp16 and bf16, head_dim 64; other calls are
declined with the reason (``auto`` then takes another backend). The kernel has no used lengths
(``seqused_q/k``): with them, this glue first packs the used positions into compact segments and
tables (``compact_segments``, ~10 small launches per call, logged once), then runs the kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import register
from ..varlen_attention import compact_segments
from . import device_reason, extension, grad_reason, logger

DTYPES = (torch.float16, torch.bfloat16)
_compact_logged = False


def _supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, *,
              q_rows=None, kv_rows=None, seqused_q=None, seqused_k=None) -> Optional[str]:
    reason = device_reason("q", q) or grad_reason(q, k, v)
    if reason is not None:
        return reason
    if q.dtype not in DTYPES:
        return f"q has dtype {q.dtype}; the cuda attention takes float16 and bfloat16"
    if not extension().attention_supports_head_dim(q.shape[-1]):
        return f"head_dim={q.shape[-1]} is not supported by the cuda attention (built for 64)"
    return None


@register("varlen_attention", "cuda", supports=_supports)
def varlen_attention_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, *, q_rows=None, kv_rows=None, seqused_q=None,
                          seqused_k=None) -> torch.Tensor:
    if seqused_q is not None or seqused_k is not None:
        global _compact_logged
        if not _compact_logged:
            _compact_logged = True
            logger.info("varlen_attention: the cuda kernel takes no seqused_q/k; the glue packs the "
                        "used positions into compact tables on every call (extra launches)")
        same = seqused_k is seqused_q and kv_rows is q_rows and cu_seqlens_k is cu_seqlens_q
        if seqused_q is not None:
            if q_rows is None:
                q_rows = torch.arange(q.shape[0], device=q.device)
            cu_seqlens_q, q_rows = compact_segments(cu_seqlens_q, seqused_q, q_rows)
        if same:  # kv="active": the keys' table is the queries'
            cu_seqlens_k, kv_rows = cu_seqlens_q, q_rows
        elif seqused_k is not None:
            if kv_rows is None:
                kv_rows = torch.arange(k.shape[0], device=k.device)
            cu_seqlens_k, kv_rows = compact_segments(cu_seqlens_k, seqused_k, kv_rows)
    return extension().varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                max_seqlen_k, softmax_scale, q_rows, kv_rows)
