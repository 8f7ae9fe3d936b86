"""Triton varlen attention forward over packed (optionally index-table) rows.

Same contract as :func:`recvit_kernels.varlen_attention`: q (total_q, H, D), k/v (total_k, H, D) with
any strides; int32 ``cu_seqlens_q/k`` on the device; host bounds ``max_seqlen_q/k``; optional
``q_rows``/``kv_rows`` index tables, optional used lengths ``seqused_q/k``. One program handles
BLOCK_M queries of one (segment, head): the grid covers the static bound ``max_seqlen_q`` and
programs past the live segment length (read from ``seqused_q``, else ``cu_seqlens_q``, and clamped
to ``max_seqlen_q``; keys likewise to ``max_seqlen_k``) return at once, so the launch never depends
on device values. Online softmax in base 2 with fp32 accumulation; outputs go to ``q_rows[p]``.
Rows no segment covers stay zero, or, with ``seqused_q``, are never touched (no zero fill: the
cost follows the used rows). When autograd records the call the kernel also stores each used
query's log-sum-exp (``STORE_LSE``, (total_q, H) fp32, base 2), from which the Triton backward
(``varlen_attention_backward``) recomputes the probabilities; inference stores nothing more.

Custom ops (``torch.library.custom_op``), so that ``torch.compile`` and ``torch.export`` see opaque
ops and trace no Triton: ``torch.ops.recvit.varlen_attention_triton`` (the forward; ``store_lse``
adds the log-sum-exp output) with its backward registered (``register_autograd``), which calls the
backward kernels' op ``torch.ops.recvit.varlen_attention_backward_triton``. That op has no
autograd of its own: the gradients are not differentiated again (an error, not zeros). We took
``register_autograd`` over flash-attention's pattern (forward and backward custom ops under a thin
``autograd.Function``) because the op then carries its own gradient: ``torch.library.opcheck``
checks the registration, and ``torch.export`` and AOTAutograd see one op, not a Python function.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._backend import call_op, register
from .._checks import values_checkable
from ..varlen_attention import _repeated_row
from ._common import (ATTENTION_TABLES, LOG2E, device_reason, dot_precision, head_tile, new_output,
                      on_device, records_grad, segment_bounds, segment_rows, unit_stride)
from .varlen_attention_backward import varlen_attention_backward

HEAD_DIMS = (16, 32, 64, 128)


@triton.jit(do_not_specialize=ATTENTION_TABLES)
def _varlen_attention_kernel(Q, K, V, O, LSE, CU_Q, CU_K, Q_ROWS, KV_ROWS, USED_Q, USED_K,
                             max_seqlen_q, max_seqlen_k,
                             sq_r, sq_h, sq_d, sk_r, sk_h, sk_d, sv_r, sv_h, sv_d,
                             so_r, so_h, so_d, scale_log2,
                             HAS_Q_ROWS: tl.constexpr, HAS_KV_ROWS: tl.constexpr,
                             HAS_USED_Q: tl.constexpr, HAS_USED_K: tl.constexpr,
                             STORE_LSE: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block = tl.program_id(0)
    segment = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, k_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < k_len
        kv_row = segment_rows(KV_ROWS, k_start, offs_n, n_valid, HAS_KV_ROWS)
        k = tl.load(head_tile(K, kv_row, head, sk_r, sk_h, sk_d, offs_d),
                    mask=n_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(head_tile(V, kv_row, head, sv_r, sv_h, sv_d, offs_d),
                    mask=n_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a segment without keys gives zeros
    tl.store(head_tile(O, q_row, head, so_r, so_h, so_d, offs_d),
             acc.to(O.dtype.element_ty), mask=m_valid[:, None])
    if STORE_LSE:  # -inf for a query without keys (the backward never reads it then)
        lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))
        tl.store(LSE + q_row * tl.num_programs(2) + head, lse, mask=m_valid)


# precision -> head_dim -> (BLOCK_M, BLOCK_N, num_warps). Each compiles without a register spill
# for sm_80 and sm_90 (benchmarks/triton_variants.md for the model's head_dim 64 under triton 3.9
# and 3.6; a one-off sweep over 16-128 under 3.9, where other tiles spilled 8-64 bytes on sm_80 at
# head_dim 32 and 128). IEEE fp32 runs on the FMA units, where 64x64 with 4 warps spilled about
# 7 KB per thread: 8 warps and 32 keys a block (16 at head_dim 128).
_TILES = {
    "16-bit": {16: (64, 64, 4), 32: (128, 64, 8), 64: (64, 64, 4), 128: (128, 64, 8)},
    "tf32": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 64, 8)},
    "ieee": {16: (64, 32, 8), 32: (64, 32, 8), 64: (64, 32, 8), 128: (64, 16, 8)},
}


def _config(dtype, head_dim):
    """(BLOCK_M, BLOCK_N, num_warps) for ``dtype`` (fp32: TF32 or IEEE, see ``dot_precision``)."""
    precision = "16-bit" if dtype != torch.float32 else dot_precision(dtype)
    return _TILES[precision][head_dim]


def _launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, q_rows,
            kv_rows, seqused_q, seqused_k, grad):
    """(out, lse): ``lse`` ((total_q, H) fp32; only used rows written) when ``grad``, else None."""
    cu_seqlens_q, cu_seqlens_k, q_rows, kv_rows, seqused_q, seqused_k = map(
        unit_stride, (cu_seqlens_q, cu_seqlens_k, q_rows, kv_rows, seqused_q, seqused_k))
    if seqused_q is None:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    else:  # rows no used position covers stay unwritten
        out = new_output(q.shape, q, grad)
    batch, heads, head_dim = cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if grad else None
    block_m, block_n, num_warps = _config(q.dtype, head_dim)
    grid = (triton.cdiv(max_seqlen_q, block_m), batch, heads)
    with on_device(q):
        _varlen_attention_kernel[grid](
            q, k, v, out, lse if grad else out, cu_seqlens_q, cu_seqlens_k,
            q_rows if q_rows is not None else cu_seqlens_q, kv_rows if kv_rows is not None else cu_seqlens_k,
            seqused_q if seqused_q is not None else cu_seqlens_q,
            seqused_k if seqused_k is not None else cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), softmax_scale * LOG2E,
            HAS_Q_ROWS=q_rows is not None, HAS_KV_ROWS=kv_rows is not None,
            HAS_USED_Q=seqused_q is not None, HAS_USED_K=seqused_k is not None, STORE_LSE=grad,
            PRECISION=dot_precision(q.dtype), HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps)
    return out, lse


@torch.library.custom_op("recvit::varlen_attention_triton", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         softmax_scale: float, q_rows: Optional[torch.Tensor],
                         kv_rows: Optional[torch.Tensor], seqused_q: Optional[torch.Tensor],
                         seqused_k: Optional[torch.Tensor], store_lse: bool) -> list[torch.Tensor]:
    """``[out]``, or ``[out, lse]`` with ``store_lse`` (what the backward needs)."""
    out, lse = _launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                       q_rows, kv_rows, seqused_q, seqused_k, store_lse)
    return [out, lse] if store_lse else [out]


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, q_rows, kv_rows,
      seqused_q, seqused_k, store_lse):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return [out, q.new_empty(q.shape[:2], dtype=torch.float32)] if store_lse else [out]


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, q_rows, kv_rows,
     seqused_q, seqused_k, store_lse) = inputs
    if store_lse:
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q_rows, kv_rows,
                              seqused_q, seqused_k)
    ctx.static = (max_seqlen_q, max_seqlen_k, softmax_scale, store_lse)
    ctx.set_materialize_grads(False)  # the log-sum-exp has no gradient: no zeros for it


def _backward(ctx, grad_outputs):
    max_q, max_k, scale, store_lse = ctx.static
    if not store_lse:
        raise RuntimeError("varlen_attention_triton: backward needs the forward run with store_lse=True")
    q, k, v, out, lse, cu_q, cu_k, q_rows, kv_rows, used_q, used_k = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = call_op(varlen_attention_backward, grad_outputs[0], q, k, v, out, lse, cu_q, cu_k, max_q,
                    max_k, scale, q_rows, kv_rows, used_q, used_k, needs_kv_grad=any(needs[1:3]))
    dq, dk, dv = (*grads, None, None) if len(grads) == 1 else grads
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            *[None] * 10)


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
              q_rows=None, kv_rows=None, seqused_q=None, seqused_k=None):
    reason = device_reason("q", q)
    if reason is not None:
        return reason
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one of {HEAD_DIMS}"
    if kv_rows is not None and records_grad(k, v) and values_checkable(kv_rows):
        row = _repeated_row(kv_rows, cu_seqlens_k, seqused_k, max_seqlen_k)
        if row is not None:
            return (f"kv_rows names key row {row} at two read positions; the backward stores each "
                    f"key row's dk/dv once (one contribution would be lost)")
    return None


@register("varlen_attention", "triton", supports=_supports)
def varlen_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, *, q_rows=None, kv_rows=None, seqused_q=None, seqused_k=None):
    """Triton forward and backward of :func:`recvit_kernels.varlen_attention`."""
    return call_op(_varlen_attention_op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   softmax_scale, q_rows, kv_rows, seqused_q, seqused_k, records_grad(q, k, v))[0]
