"""Triton backward of the prefix linear over the live rows: every GEMM reduces, and every store
writes, the rows r < M = ``num_rows[0]`` only (M read on the device, launch shapes static).

For the forward ``out = act(x @ weight.T + bias) [+ residual]`` at rows < M (``x`` (R, K), ``weight``
(N, K)), given ``grad_out`` (R, N), :func:`prefix_linear_backward` returns the list of those of
``dx, dweight, dbias, dresidual`` asked for, in that order:

- ``dpre = grad_out * gelu'(pre)`` with exact (erf) GELU, ``pre`` (R, N) the GELU input the forward
  stored at the live rows; without GELU ``dpre = grad_out``;
- ``dx`` (R, K) ``= dpre @ weight`` at rows < M, zero below: the forward's GEMM kernel with the
  weight's strides swapped, no epilogue, and its row blocks past M storing zeros (``ZERO_DEAD``);
- ``dweight`` (N, K) ``= dpre[:M].T @ x[:M]`` and ``dbias`` (N,) the column sums of ``dpre[:M]``:
  ``_prefix_linear_dweight_kernel``, one program per (N, K) tile looping over the live row blocks
  (its loop bound read on the device), fp32 accumulation, the bias sums taken by the programs of the
  first K tile (M = 0 gives zeros);
- ``dresidual`` (R, N) ``= grad_out`` at rows < M, zero below.

``dpre`` (with GELU) and ``dresidual`` come from one element-wise pass, ``_prefix_linear_grad_rows_kernel``
(the rows past M get their zero ``dresidual`` there, nothing else). fp32 inputs follow
``_common.dot_precision`` as the forward does.

``prefix_linear_backward`` is the custom op ``torch.ops.recvit.prefix_linear_backward_triton``
(opaque to ``torch.compile`` / ``torch.export``, fake implementation registered), without an autograd
formula of its own: the forward's registered backward calls it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import prefix_gemm  # its GEMM kernel computes dX
from ._common import dot_precision, interpreting, on_device, unit_columns


@triton.jit(do_not_specialize=["NUM_ROWS", "rows"])
def _prefix_linear_grad_rows_kernel(G, PRE, DPRE, DRES, NUM_ROWS, rows, cols, sg, sp, sdp, sdr,
                                    GELU: tl.constexpr, HAS_DRES: tl.constexpr,
                                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    first = tl.program_id(0) * BLOCK_ROWS
    offs_r = (first + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_valid = offs_c < cols
    live = tl.minimum(tl.load(NUM_ROWS).to(tl.int64), rows)
    live_mask = (offs_r < live)[:, None] & c_valid[None, :]
    g = tl.load(G + offs_r[:, None] * sg + offs_c[None, :], mask=live_mask, other=0.0)
    if HAS_DRES:  # zeros past the live rows
        tl.store(DRES + offs_r[:, None] * sdr + offs_c[None, :], g.to(DRES.dtype.element_ty),
                 mask=(offs_r < rows)[:, None] & c_valid[None, :])
    if GELU:
        if first < live:
            pre = tl.load(PRE + offs_r[:, None] * sp + offs_c[None, :], mask=live_mask, other=0.0)
            pre = pre.to(tl.float32)
            cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
            pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327
            dpre = g.to(tl.float32) * (cdf + pre * pdf)
            tl.store(DPRE + offs_r[:, None] * sdp + offs_c[None, :], dpre.to(DPRE.dtype.element_ty),
                     mask=live_mask)


@triton.jit(do_not_specialize=["NUM_ROWS", "rows"])
def _prefix_linear_dweight_kernel(D, X, DW, DB, NUM_ROWS, rows, n_out, k_dim, sdm, sdn, sxm, sxk, sdw,
                                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    live = tl.minimum(tl.load(NUM_ROWS).to(tl.int64), rows)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_valid, k_valid = offs_n < n_out, offs_k < k_dim
    sums = pid_k == 0  # this program also sums the bias gradient of its N tile
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    for m in range(0, live, BLOCK_M):
        m_live = offs_m < live - m
        d = tl.load(D + (m + offs_m)[:, None] * sdm + offs_n[None, :] * sdn,
                    mask=m_live[:, None] & n_valid[None, :], other=0.0)
        x = tl.load(X + (m + offs_m)[:, None] * sxm + offs_k[None, :] * sxk,
                    mask=m_live[:, None] & k_valid[None, :], other=0.0)
        acc = tl.dot(tl.trans(d), x, acc, input_precision=PRECISION)
        if HAS_BIAS:
            if sums:
                bias_acc += tl.sum(d.to(tl.float32), 0)
    tl.store(DW + offs_n[:, None] * sdw + offs_k[None, :], acc.to(DW.dtype.element_ty),
             mask=n_valid[:, None] & k_valid[None, :])
    if HAS_BIAS:
        if sums:
            tl.store(DB + offs_n, bias_acc.to(DB.dtype.element_ty), mask=n_valid)


def _dweight_config(n_out, k_dim, dtype):
    """(BLOCK_N, BLOCK_K, BLOCK_M (the reduction over rows), num_warps, num_stages) of the
    (n_out, k_dim) weight gradient: the forward's tiles (``prefix_gemm.TILES``, each compiling
    without a spill here too: tests/test_triton_compile.py) over the output's N and K, the largest
    that still gives about one wave of programs. Not tuned on a GPU; no split over the rows yet, so
    a small weight (few tiles) reduces long row loops in few programs."""
    if interpreting():
        return 32, 32, 32, 4, 1
    tiles = prefix_gemm.TILES["16-bit" if dtype != torch.float32 else dot_precision(dtype)]
    for tile in tiles:
        if triton.cdiv(n_out, tile[0]) * triton.cdiv(k_dim, tile[1]) >= prefix_gemm.MIN_PROGRAMS:
            return tile
    return tiles[-1]


@torch.library.custom_op("recvit::prefix_linear_backward_triton", mutates_args=())
def prefix_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           num_rows: torch.Tensor, pre: Optional[torch.Tensor], has_bias: bool,
                           needs_x: bool = True, needs_weight: bool = True,
                           needs_residual: bool = True) -> list[torch.Tensor]:
    """``[dx (R, K), dweight (N, K), dbias (N,), dresidual (R, N)]`` of the prefix linear at the rows
    < ``num_rows[0]`` (zero at the others), GELU's with ``pre`` (R, N) given; only those asked for
    (``needs_weight``: dweight and, with ``has_bias``, dbias)."""
    rows, k_dim = x.shape
    n_out = weight.shape[0]
    dx = dweight = dbias = dresidual = None
    grad_out, pre = unit_columns(grad_out), unit_columns(pre)
    dpre = grad_out
    if pre is not None or needs_residual:
        if pre is not None:
            dpre = torch.empty((rows, n_out), dtype=grad_out.dtype, device=grad_out.device)
        if needs_residual:
            dresidual = torch.empty((rows, n_out), dtype=grad_out.dtype, device=grad_out.device)
        block_cols = min(128, triton.next_power_of_2(n_out))
        grid = (triton.cdiv(rows, 32), triton.cdiv(n_out, block_cols))
        d, r, p = dpre, (dresidual if needs_residual else grad_out), (pre if pre is not None else grad_out)
        if rows and n_out:
            with on_device(x):
                _prefix_linear_grad_rows_kernel[grid](
                    grad_out, p, d, r, num_rows, rows, n_out, grad_out.stride(0), p.stride(0),
                    d.stride(0), r.stride(0), GELU=pre is not None, HAS_DRES=needs_residual,
                    BLOCK_ROWS=32, BLOCK_COLS=block_cols)
    if needs_x:
        dx = prefix_gemm.launch(dpre, weight.t(), None, num_rows, None, None,
                             torch.empty((rows, k_dim), dtype=x.dtype, device=x.device), zero_dead=True)
    if needs_weight:
        dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        dbias = torch.empty(n_out, dtype=weight.dtype, device=weight.device) if has_bias else None
        block_n, block_k, block_m, num_warps, num_stages = _dweight_config(n_out, k_dim, x.dtype)
        grid = (triton.cdiv(n_out, block_n), triton.cdiv(k_dim, block_k))
        if n_out and k_dim:
            with on_device(x):
                _prefix_linear_dweight_kernel[grid](
                    dpre, x, dweight, dbias if has_bias else dweight, num_rows, rows, n_out, k_dim,
                    dpre.stride(0), dpre.stride(1), x.stride(0), x.stride(1), dweight.stride(0),
                    HAS_BIAS=has_bias, PRECISION=dot_precision(x.dtype), BLOCK_N=block_n,
                    BLOCK_K=block_k, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages)
    return [grad for grad in (dx, dweight, dbias, dresidual) if grad is not None]


@prefix_linear_backward.register_fake
def _(grad_out, x, weight, num_rows, pre, has_bias, needs_x=True, needs_weight=True, needs_residual=True):
    grads = [x.new_empty(x.shape)] if needs_x else []
    if needs_weight:
        grads += [weight.new_empty(weight.shape)] + ([weight.new_empty(weight.shape[0])] if has_bias else [])
    if needs_residual:
        grads.append(grad_out.new_empty((x.shape[0], weight.shape[0])))
    return grads
