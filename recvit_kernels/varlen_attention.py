"""Varlen attention over packed rows, in flash-attention's ``flash_attn_varlen_func`` convention.

``q`` is (total_q, heads, head_dim); ``k``, ``v`` are (total_k, heads, head_dim). Segment b (one image)
has queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and keys ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``;
each query attends to the keys of its own segment, without a causal mask:
``out = softmax(q k^T * softmax_scale) v`` with ``softmax_scale`` defaulting to ``head_dim ** -0.5``.

Indexed form (the depth-sorted layout's "index table"): with ``q_rows`` given, segment positions are
looked up through it, i.e. the queries of segment b are ``q[q_rows[cu_seqlens_q[b]:cu_seqlens_q[b+1]]]``
and their outputs are written to those same rows; ``kv_rows`` does the same for keys and values.
Rows of the output that no segment covers, and the queries of a segment without keys, are zero
(as torch's SDPA gives for no keys, and flash-attention for an empty key segment); so with no
query rows at all the output is empty, shaped like ``q``, and with no key rows it is zero.
``q_rows`` must name each row at most once among the positions read: a row named twice would be
written twice (by two programs, racing on a GPU) and its gradient is undefined, so it is refused
(``ValueError``) where values are checkable (:func:`values_checkable`: on the CPU, or with
``RECVIT_CHECK_VALUES=1``) and the result is unspecified elsewhere. ``kv_rows`` may name a key row
twice (it is attended twice; the triton backend's backward declines that, see its module).

Used lengths (flash-attention 3's ``seqused_q`` / ``seqused_k``): with ``seqused_q`` given, a (B,)
int32 device tensor, segment b's queries are only the first ``seqused_q[b]`` positions from
``cu_seqlens_q[b]`` (at most the segment's length); likewise ``seqused_k`` for the keys. Static
segment starts plus used lengths let one index table serve every recursion step (the depth-sorted
layout's ``image_order`` with starts b*N). With ``seqused_q`` the output is allocated without a
fill, as flash-attention does: rows no used position covers are unspecified (the eager op leaves
them zero), so that the cost follows the used rows.

``max_seqlen_q`` / ``max_seqlen_k`` are host integers bounding the segment lengths (a static bound
such as the image's token count keeps the call free of host syncs); the lengths themselves are only
read from the device tensors. As in flash-attention, the launch is sized by them: every backend
takes at most the first ``max_seqlen_q`` queries and ``max_seqlen_k`` keys of each segment (the
queries past the bound count as uncovered).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import dispatch, register
from ._checks import check_cu_seqlens, check_floating, check_tensor, values_checkable


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, softmax_scale: Optional[float] = None,
                     *, q_rows: Optional[torch.Tensor] = None, kv_rows: Optional[torch.Tensor] = None,
                     seqused_q: Optional[torch.Tensor] = None, seqused_k: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Attention of each segment's queries over its keys; returns a tensor shaped like ``q``."""
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_rows, kv_rows,
                  seqused_q, seqused_k)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    tables = dict(q_rows=q_rows, kv_rows=kv_rows, seqused_q=seqused_q, seqused_k=seqused_k)
    implementation = dispatch("varlen_attention", backend, *args, **tables)
    return implementation(*args, **tables)


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_rows, kv_rows,
                  seqused_q=None, seqused_k=None):
    check_tensor("q", q, 3)
    for name, tensor in (("k", k), ("v", v)):
        check_tensor(name, tensor, 3, q.dtype, q.device)
        if tensor.shape[1:] != q.shape[1:]:
            raise ValueError(f"{name}: expected (total_k, {q.shape[1]}, {q.shape[2]}) like q, "
                             f"got {tuple(tensor.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"v: expected {k.shape[0]} rows like k, got {v.shape[0]}")
    check_floating("q", q)
    for name, rows in (("q_rows", q_rows), ("kv_rows", kv_rows)):
        if rows is not None:
            check_tensor(name, rows, 1, (torch.int32, torch.int64), q.device)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device,
                     q.shape[0] if q_rows is None else q_rows.numel())
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device,
                     k.shape[0] if kv_rows is None else kv_rows.numel())
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.numel()} entries like "
                         f"cu_seqlens_q, got {cu_seqlens_k.numel()}")
    for name, used, cu in (("seqused_q", seqused_q, cu_seqlens_q), ("seqused_k", seqused_k, cu_seqlens_k)):
        if used is None:
            continue
        check_tensor(name, used, 1, torch.int32, q.device)
        if used.numel() != cu.numel() - 1:
            raise ValueError(f"{name}: expected {cu.numel() - 1} entries (one per segment), "
                             f"got {used.numel()}")
        if values_checkable(used) and bool(((used < 0) | (used > cu[1:] - cu[:-1])).any()):
            raise ValueError(f"{name}: entries must lie in 0..the segment's length, got "
                             f"{used.tolist()} for lengths {(cu[1:] - cu[:-1]).tolist()}")
    # Only the index-table entries a used position reads must name a row.
    for name, rows, tensor, cu, used in (("q_rows", q_rows, q, cu_seqlens_q, seqused_q),
                                         ("kv_rows", kv_rows, k, cu_seqlens_k, seqused_k)):
        if rows is not None and rows.numel() and values_checkable(rows):
            read = rows[_used_positions(cu, used, rows.numel())]
            if read.numel() and (int(read.min()) < 0 or int(read.max()) >= tensor.shape[0]):
                raise ValueError(f"{name}: entries must index the {tensor.shape[0]} rows given")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive host int, got {value!r}")
    if q_rows is not None and values_checkable(q_rows):
        row = _repeated_row(q_rows, cu_seqlens_q, seqused_q, max_seqlen_q)
        if row is not None:
            raise ValueError(f"q_rows: names row {row} at two read positions; each output row must be "
                             f"written by one query")


def _repeated_row(rows, cu_seqlens, seqused, max_seqlen) -> Optional[int]:
    """A row that two of the positions the kernels read (the used ones, up to ``max_seqlen`` per
    segment) name in the table ``rows``, or None (reads the table back to the host: only where
    values are checkable)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1] if seqused is None else seqused
    read = rows[_used_positions(cu_seqlens, lengths.clamp_max(max_seqlen), rows.numel())]
    ordered = torch.sort(read).values
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    return int(repeated[0]) if repeated.numel() else None


def _used_positions(cu_seqlens, seqused, total):
    """(total,) bool: which positions of the packed segments are used (host-side checks only)."""
    position = torch.arange(total, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(torch.int64), position, right=True)
    segment = segment.clamp_max(cu_seqlens.numel() - 2)
    end = cu_seqlens[1:] if seqused is None else cu_seqlens[:-1] + seqused
    return (position >= cu_seqlens[segment]) & (position < end[segment])


def _segment_rows(cu_seqlens, max_seqlen, rows, seqused=None):
    """(B, max_seqlen) row of each segment position, and whether the position is used."""
    position = torch.arange(max_seqlen, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].to(torch.int64)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1] if seqused is None else seqused).to(torch.int64)
    valid = position < lengths[:, None]
    flat = torch.where(valid, starts[:, None] + position, 0)
    if rows is not None and rows.numel():  # an unused entry may name a row past the tensor: row 0
        flat = torch.where(valid, rows.to(torch.int64)[flat], 0)
    return flat, valid


def _padded(x, row, valid):
    """(B, H, max_len, D): ``x[row]`` per segment position, zero where the position is unused.

    The padding reads a row of some other segment (row 0); ``torch.where`` replaces it with zeros,
    so a NaN or inf there never reaches this segment (a masked weight of 0 times NaN is NaN), in
    the forward or, through the padded queries, in the backward. An ``x`` without rows (no position
    used) is read through one appended zero row.
    """
    if not x.shape[0]:
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return torch.where(valid[:, :, None, None], x[row], 0.0).transpose(1, 2)


def _varlen_attention_eager(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, *, q_rows=None, kv_rows=None, seqused_q=None, seqused_k=None):
    """Pad each segment to the static bound, run SDPA with a key mask, write the rows back."""
    batch = cu_seqlens_q.numel() - 1
    query_row, query_valid = _segment_rows(cu_seqlens_q, max_seqlen_q, q_rows, seqused_q)
    key_row, key_valid = _segment_rows(cu_seqlens_k, max_seqlen_k, kv_rows, seqused_k)
    padded_q = _padded(q, query_row, query_valid)  # (B, H, max_q, D)
    padded_k = _padded(k, key_row, key_valid)
    padded_v = _padded(v, key_row, key_valid)
    # A segment without keys attends to nothing: its rows are zero (flash-attention's convention).
    # Unmasking its (zero) padding keeps SDPA finite; the result is then replaced by zeros.
    has_keys = key_valid.any(1, keepdim=True)
    key_mask = key_valid | ~has_keys
    out = F.scaled_dot_product_attention(padded_q, padded_k, padded_v,
                                         attn_mask=key_mask[:, None, None, :], scale=softmax_scale)
    out = torch.where(has_keys[:, :, None, None], out, 0.0)
    out = out.transpose(1, 2).reshape(batch * max_seqlen_q, *q.shape[1:])
    dump_row = q.shape[0]  # positions outside their segment are written to a row that is dropped
    target = torch.where(query_valid, query_row, dump_row).reshape(-1)
    result = q.new_zeros(q.shape[0] + 1, *q.shape[1:])
    return result.index_copy(0, target, out)[:dump_row]


register("varlen_attention", "eager")(_varlen_attention_eager)
register("varlen_attention", "packed")(_varlen_attention_eager)
