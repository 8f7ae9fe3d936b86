"""The GEMM kernel of the Triton prefix linear, shared by its forward op (``prefix_linear.py``) and
its backward's dX (``prefix_linear_backward.py``): ``act(x @ weight.T + bias) (+ residual)`` at the
live rows < M of an (R, K) ``x``, M read from ``num_rows`` on the device; the kernel and its tiles
are described in ``prefix_linear.py``'s docstring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, interpreting, on_device, unit_stride


# NUM_ROWS (a slice of the per-step counts: its 16-byte alignment alternates step to step) and
# rows (the live count on the packed path) are data: specialising on them only recompiles.
@triton.jit(do_not_specialize=["NUM_ROWS", "rows"])
def _prefix_linear_kernel(X, W, B, R, O, P, NUM_ROWS, rows, n_out, k_dim, sxm, sxk, swn, swk, srm, srn,
                          som, spm, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                          STORE_PRE: tl.constexpr, ZERO_DEAD: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(rows, BLOCK_M), tl.cdiv(n_out, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_size
    pid_n = (pid % (GROUP_M * blocks_n)) // group_size

    live = tl.minimum(tl.load(NUM_ROWS).to(tl.int64), rows)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < n_out
    # the rows the final store writes: the live ones, or (ZERO_DEAD) every row, zero past M
    stored = (offs_m < rows if ZERO_DEAD else offs_m < live)[:, None] & n_valid[None, :]
    if pid_m * BLOCK_M >= live:
        if ZERO_DEAD:
            tl.store(O + offs_m[:, None] * som + offs_n[None, :],
                     tl.zeros((BLOCK_M, BLOCK_N), O.dtype.element_ty), mask=stored)
        return
    m_live = offs_m < live
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[:, None] * sxm + offs_k[None, :] * sxk
    w_ptrs = W + offs_n[None, :] * swn + offs_k[:, None] * swk
    for k in range(0, k_dim, BLOCK_K):
        k_valid = offs_k < k_dim - k
        a = tl.load(x_ptrs, mask=m_live[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:  # GELU's input, for the backward
        tl.store(P + offs_m[:, None] * spm + offs_n[None, :], acc.to(P.dtype.element_ty),
                 mask=m_live[:, None] & n_valid[None, :])
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    if HAS_RESIDUAL:
        acc += tl.load(R + offs_m[:, None] * srm + offs_n[None, :] * srn,
                       mask=m_live[:, None] & n_valid[None, :], other=0.0).to(tl.float32)
    if ZERO_DEAD:
        acc = tl.where(m_live[:, None], acc, 0.0)
    tl.store(O + offs_m[:, None] * som + offs_n[None, :], acc.to(O.dtype.element_ty), mask=stored)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), largest first; each compiles without a
# register spill for sm_80 and sm_90 (benchmarks/triton_variants.md). Tensor cores: the 16-bit
# tiles (BLOCK_M 32 runs mma.sync on sm_90 too: wgmma needs 64 rows); TF32 halves BLOCK_K for the
# same shared memory; IEEE fp32 runs on the FMA units, where 4 warps on 64x64 spill on sm_80 and
# 128x64 with GELU spills under triton 3.6.
TILES = {
    "16-bit": ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4)),
    "tf32": ((128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3)),
    "ieee": ((64, 64, 32, 8, 3), (32, 64, 32, 4, 3)),
}
# A tile is taken when it gives at least this many programs: about one wave on an A100 (108 SMs)
# or an H100 (132). Fewer rows (batch 1: 197) get smaller tiles, down to the smallest.
MIN_PROGRAMS = 128


def config(rows, n_out, dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a (rows, n_out) output.

    ``rows`` is the static row bound (the live count is on the device). Not tuned on a GPU yet:
    the largest tile of :data:`TILES` that still fills about one wave of SMs. Split-K for the
    few-row, long-K GEMMs (fc2 at batch 1) is not done: the epilogue (GELU, residual) would need a
    second pass.
    """
    if interpreting():
        return 32, 32, 32, 4, 1
    precision = dot_precision(dtype)
    tiles = TILES["16-bit" if dtype != torch.float32 else precision]
    for tile in tiles:
        if triton.cdiv(rows, tile[0]) * triton.cdiv(n_out, tile[1]) >= MIN_PROGRAMS:
            return tile
    return tiles[-1]


def launch(x, weight, bias, num_rows, activation, residual, out, pre=None, zero_dead=False):
    """``out`` (and GELU's input ``x @ weight.T + bias`` into ``pre``, if given) at the live rows;
    with ``zero_dead`` zeros at the other rows of ``out`` (the backward's dX)."""
    rows, k_dim = x.shape
    n_out = weight.shape[0]
    if out.numel() == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = config(rows, n_out, x.dtype)
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(n_out, block_n),)
    bias = unit_stride(bias)
    r = residual if residual is not None else out
    p = pre if pre is not None else out
    with on_device(x):
        _prefix_linear_kernel[grid](
            x, weight, bias if bias is not None else weight, r, out, p, num_rows, rows, n_out, k_dim,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), r.stride(0), r.stride(1),
            out.stride(0), p.stride(0), HAS_BIAS=bias is not None, GELU=activation == "gelu",
            HAS_RESIDUAL=residual is not None, STORE_PRE=pre is not None, ZERO_DEAD=zero_dead,
            PRECISION=dot_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=num_warps,
            num_stages=num_stages)
    return out
