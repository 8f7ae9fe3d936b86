"""Triton backward of the varlen attention forward (flash-attention 2's scheme, without atomics).

Given the forward's inputs q (total_q, H, D), k/v (total_k, H, D), its output ``out`` (like q), the
per-row log-sum-exp ``lse`` ((total_q, H) fp32, base 2, of the scaled scores; written by the forward
when autograd records it) and ``grad_out`` (like q), returns ``(dq, dk, dv)`` shaped like q, k, v,
without materialising the attention matrix: the probabilities are recomputed tile by tile from
``lse``. Segments, index tables, used lengths and the ``max_seqlen`` clamps are read exactly as the
forward reads them; gradients go to the rows the tables name, and every other row's gradient is zero
(as is that of a segment without keys or without queries).

Two kernels, no atomics: ``_varlen_attention_dq_kernel`` (one program per BLOCK_M queries of a
(segment, head)) computes ``delta = rowsum(dO * O)``, stores it, and accumulates dQ over the keys;
then ``_varlen_attention_dkdv_kernel`` (one program per BLOCK_N keys) accumulates dK and dV over the
queries. Against flash-attention 2's single kernel with an atomic fp32 dQ this recomputes the scores
once more, but needs no fp32 dQ buffer (its fill and its cast back are two launches and 2x dQ's bytes
each), no separate delta launch (the dQ kernel already reads dO and O), and is deterministic.
Accumulation is fp32; the key-side kernel stores each read key position's dK/dV to its row, so a
key row named at two read positions of ``kv_rows`` (in two segments, or twice in one) would keep
one contribution. Every layout here names each row once (``kv_rows`` is a permutation, segments
are disjoint); the forward's ``supports`` check declines a table that repeats a row when autograd
records the call and its values are checkable (``values_checkable``: on the CPU, or with
``RECVIT_CHECK_VALUES=1``), and ``auto`` then runs it on packed, whose gradient adds them up.
The dQ kernel likewise stores each query's dQ to its row; a ``q_rows`` naming a row twice is
refused by the op itself (its forward is undefined too).

``varlen_attention_backward`` is the custom op ``torch.ops.recvit.varlen_attention_backward_triton``
(opaque to ``torch.compile`` / ``torch.export``, fake implementation registered), without an
autograd formula of its own: the forward's registered backward calls it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (ATTENTION_TABLES, LOG2E, dot_precision, head_tile, on_device, segment_bounds,
                      segment_rows, unit_stride)


# Data-dependent tables and bounds: not specialised (see the forward kernel).
@triton.jit(do_not_specialize=ATTENTION_TABLES)
def _varlen_attention_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, CU_Q, CU_K, Q_ROWS, KV_ROWS, USED_Q,
                                USED_K, max_seqlen_q, max_seqlen_k,
                                sq_r, sq_h, sq_d, sk_r, sk_h, sk_d, sv_r, sv_h, sv_d,
                                so_r, so_h, so_d, sdo_r, sdo_h, sdo_d, sdq_r, sdq_h, sdq_d,
                                scale, scale_log2,
                                HAS_Q_ROWS: tl.constexpr, HAS_KV_ROWS: tl.constexpr,
                                HAS_USED_Q: tl.constexpr, HAS_USED_K: tl.constexpr,
                                PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block = tl.program_id(0)
    segment = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    heads = tl.num_programs(2)
    q_start, q_len = segment_bounds(CU_Q, USED_Q, segment, max_seqlen_q, HAS_USED_Q)
    if block * BLOCK_M >= q_len:
        return
    k_start, k_len = segment_bounds(CU_K, USED_K, segment, max_seqlen_k, HAS_USED_K)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    q_row = segment_rows(Q_ROWS, q_start, offs_m, m_valid, HAS_Q_ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(head_tile(Q, q_row, head, sq_r, sq_h, sq_d, offs_d),
                mask=m_valid[:, None], other=0.0)
    do = tl.load(head_tile(DO, q_row, head, sdo_r, sdo_h, sdo_d, offs_d),
                 mask=m_valid[:, None], other=0.0)
    o = tl.load(head_tile(O, q_row, head, so_r, so_h, so_d, offs_d),
                mask=m_valid[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + q_row * heads + head, delta, mask=m_valid)
    lse = tl.load(LSE + q_row * heads + head, mask=m_valid, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, k_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < k_len
        kv_row = segment_rows(KV_ROWS, k_start, offs_n, n_valid, HAS_KV_ROWS)
        k = tl.load(head_tile(K, kv_row, head, sk_r, sk_h, sk_d, offs_d),
                    mask=n_valid[:, None], other=0.0)
        v = tl.load(head_tile(V, kv_row, head, sv_r, sv_h, sv_d, offs_d),
                    mask=n_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        # a masked key (k = v = 0) would give p = exp2(-lse), which overflows for lse < -128
        p = tl.where(n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(head_tile(DQ, q_row, head, sdq_r, sdq_h, sdq_d, offs_d),
             (dq * scale).to(DQ.dtype.element_ty), mask=m_valid[:, None])


@triton.jit(do_not_specialize=ATTENTION_TABLES)
def _varlen_attention_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, Q_ROWS, KV_ROWS, USED_Q,
                                  USED_K, max_seqlen_q, max_seqlen_k,
                                  sq_r, sq_h, sq_d, sk_r, sk_h, sk_d, sv_r, sv_h, sv_d,
                                  sdo_r, sdo_h, sdo_d, sdk_r, sdk_h, sdk_d, sdv_r, sdv_h, sdv_d,
                                  scale, scale_log2,
                                  HAS_Q_ROWS: tl.constexpr, HAS_KV_ROWS: tl.constexpr,
                                  HAS_USED_Q: tl.constexpr, HAS_USED_K: tl.constexpr,
                                  PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block = tl.program_id(0)
    segment = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    heads = tl.num_programs(2)
    k_start, k_len = segment_bounds(CU_K, USED_K, segment, max_seqlen_k, HAS_USED_K)
    if block * BLOCK_N >= k_len:
        return
    q_start, q_len = segment_bounds(CU_Q, USED_Q, segment, max_seqlen_q, HAS_USED_Q)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < k_len
    kv_row = segment_rows(KV_ROWS, k_start, offs_n, n_valid, HAS_KV_ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(head_tile(K, kv_row, head, sk_r, sk_h, sk_d, offs_d),
                mask=n_valid[:, None], other=0.0)
    v = tl.load(head_tile(V, kv_row, head, sv_r, sv_h, sv_d, offs_d),
                mask=n_valid[:, None], other=0.0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for m0 in range(0, q_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < q_len
        q_row = segment_rows(Q_ROWS, q_start, offs_m, m_valid, HAS_Q_ROWS)
        q = tl.load(head_tile(Q, q_row, head, sq_r, sq_h, sq_d, offs_d),
                    mask=m_valid[:, None], other=0.0)
        do = tl.load(head_tile(DO, q_row, head, sdo_r, sdo_h, sdo_d, offs_d),
                     mask=m_valid[:, None], other=0.0)
        lse = tl.load(LSE + q_row * heads + head, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + q_row * heads + head, mask=m_valid, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # (keys, queries)
        # no mask: a masked query loads q = dO = lse = delta = 0, so its p = 1 meets dO = 0 and
        # ds = 0; a masked key's row (p may overflow there) is never stored
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    tl.store(head_tile(DK, kv_row, head, sdk_r, sdk_h, sdk_d, offs_d),
             (dk * scale).to(DK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(head_tile(DV, kv_row, head, sdv_r, sdv_h, sdv_d, offs_d),
             dv.to(DV.dtype.element_ty), mask=n_valid[:, None])


# precision -> head_dim -> ((dQ kernel BLOCK_M, BLOCK_N, warps), (dK/dV kernel BLOCK_M, BLOCK_N, warps)).
# Each compiles without a register spill for sm_80 and sm_90 under triton 3.9 (a one-off sweep of
# every entry in bf16/fp16/fp32/TF32, kv active and all; tests/test_triton_compile.py keeps head_dim
# 64 checked): the dK/dV kernel holds two fp32 (BLOCK_N, D) accumulators, and where 4 warps on 64
# queries x 64 keys spilled 16-40 bytes (TF32 at head_dim 32 and 128, 16-bit at 128) it takes 32
# queries a block (at 128 also 8 warps; TF32 32 keys). Under triton 3.6 (the GPU machines'), head_dim
# 64 also spilled on sm_80 with 16-bit 64x64 and TF32 32x64 dK/dV tiles: those take 32 queries and,
# for TF32, 32 keys; the other head_dims are checked under 3.9 only. IEEE fp32 dots run on the FMA
# units: 32-row tiles.
_TILES = {
    "16-bit": {16: ((64, 64, 4), (64, 64, 4)), 32: ((64, 64, 4), (64, 64, 4)),
               64: ((64, 64, 4), (32, 64, 4)), 128: ((64, 32, 4), (32, 64, 8))},
    "tf32": {16: ((64, 64, 4), (64, 64, 4)), 32: ((64, 64, 4), (32, 64, 4)),
             64: ((64, 32, 4), (32, 32, 4)), 128: ((64, 32, 8), (32, 32, 8))},
    "ieee": {16: ((32, 32, 4), (32, 32, 4)), 32: ((32, 32, 4), (32, 32, 4)),
             64: ((32, 32, 8), (32, 32, 8)), 128: ((32, 16, 8), (16, 32, 8))},
}


def _config(dtype, head_dim):
    """((BLOCK_M, BLOCK_N, num_warps) of the dQ kernel, the same of the dK/dV kernel)."""
    precision = "16-bit" if dtype != torch.float32 else dot_precision(dtype)
    return _TILES[precision][head_dim]


@torch.library.custom_op("recvit::varlen_attention_backward_triton", mutates_args=())
def varlen_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                              softmax_scale: float, q_rows: Optional[torch.Tensor] = None,
                              kv_rows: Optional[torch.Tensor] = None,
                              seqused_q: Optional[torch.Tensor] = None,
                              seqused_k: Optional[torch.Tensor] = None,
                              needs_kv_grad: bool = True) -> list[torch.Tensor]:
    """``[dq, dk, dv]`` of the varlen attention forward; ``[dq]`` unless ``needs_kv_grad``."""
    cu_seqlens_q, cu_seqlens_k, q_rows, kv_rows, seqused_q, seqused_k = map(
        unit_stride, (cu_seqlens_q, cu_seqlens_k, q_rows, kv_rows, seqused_q, seqused_k))
    batch, heads, head_dim = cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
    (dq_m, dq_n, dq_warps), (kv_m, kv_n, kv_warps) = _config(q.dtype, head_dim)
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # only used rows are read
    tables = (cu_seqlens_q, cu_seqlens_k, q_rows if q_rows is not None else cu_seqlens_q,
              kv_rows if kv_rows is not None else cu_seqlens_k,
              seqused_q if seqused_q is not None else cu_seqlens_q,
              seqused_k if seqused_k is not None else cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    flags = dict(HAS_Q_ROWS=q_rows is not None, HAS_KV_ROWS=kv_rows is not None,
                 HAS_USED_Q=seqused_q is not None, HAS_USED_K=seqused_k is not None,
                 PRECISION=dot_precision(q.dtype), HEAD_DIM=head_dim)
    scales = (softmax_scale, softmax_scale * LOG2E)
    with on_device(q):
        _varlen_attention_dq_kernel[(triton.cdiv(max_seqlen_q, dq_m), batch, heads)](
            q, k, v, out, grad_out, lse, delta, dq, *tables,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq.stride(),
            *scales, **flags, BLOCK_M=dq_m, BLOCK_N=dq_n, num_warps=dq_warps)
    if not needs_kv_grad:
        return [dq]
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    with on_device(q):
        _varlen_attention_dkdv_kernel[(triton.cdiv(max_seqlen_k, kv_n), batch, heads)](
            q, k, v, grad_out, lse, delta, dk, dv, *tables,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            *scales, **flags, BLOCK_M=kv_m, BLOCK_N=kv_n, num_warps=kv_warps)
    return [dq, dk, dv]


@varlen_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, q_rows=None, kv_rows=None, seqused_q=None, seqused_k=None, needs_kv_grad=True):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    return grads if needs_kv_grad else grads[:1]
