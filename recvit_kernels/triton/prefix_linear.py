"""Triton prefix linear: a tiled GEMM that skips the row blocks past the live row count M.

Same contract as :func:`recvit_kernels.prefix_linear`. The grid is static, cdiv(R, BLOCK_M) x
cdiv(N_out, BLOCK_N) programs in grouped order (Triton's matmul tutorial); each loads M from
``num_rows``. A program whose row block starts at or past M returns at once (``ZERO_DEAD``, for the
backward's dX: after storing zeros there); the others
accumulate ``x @ weight.T`` in fp32 with ``tl.dot`` (fp32 inputs in TF32 or IEEE precision as
``torch.backends.cuda.matmul.allow_tf32`` says, as for the eager op's cuBLAS GEMM:
``_common.dot_precision``), add the bias, apply the exact (erf) GELU, add the residual, round once
and store the rows < M only. With ``out`` the live rows go into it in place (``out`` may be the
residual: each element's residual is read by the program that then overwrites it). Under autograd
with GELU it also stores GELU's input at the live rows (``STORE_PRE``); the backward is the Triton
kernels of ``prefix_linear_backward.py``, over the live rows too.

Two custom ops (``torch.library.custom_op``, so ``torch.compile`` and ``torch.export`` see them
opaque): ``torch.ops.recvit.prefix_linear_triton`` returns a new result (and, with ``grad`` and
GELU, GELU's input as a second output) and has its backward registered (``register_autograd``),
which calls the backward kernels' op ``torch.ops.recvit.prefix_linear_backward_triton``;
``torch.ops.recvit.prefix_linear_triton_`` writes into ``out`` (``mutates_args``), for inference.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._backend import call_op, register
from . import prefix_linear_backward as backward_kernels  # a module import: they import each other
from ._common import (device_reason, dot_precision, interpreting, new_output, on_device, records_grad,
                      unit_stride)


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
_TILES = {
    "16-bit": ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4)),
    "tf32": ((128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3)),
    "ieee": ((64, 64, 32, 8, 3), (32, 64, 32, 4, 3)),
}
# A tile is taken when it gives at least this many programs: about one wave on an A100 (108 SMs)
# or an H100 (132). Fewer rows (batch 1: 197) get smaller tiles, down to the smallest.
_MIN_PROGRAMS = 128


def _config(rows, n_out, dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a (rows, n_out) output.

    ``rows`` is the static row bound (the live count is on the device). Not tuned on a GPU yet:
    the largest tile of :data:`_TILES` that still fills about one wave of SMs. Split-K for the
    few-row, long-K GEMMs (fc2 at batch 1) is not done: the epilogue (GELU, residual) would need a
    second pass.
    """
    if interpreting():
        return 32, 32, 32, 4, 1
    precision = dot_precision(dtype)
    tiles = _TILES["16-bit" if dtype != torch.float32 else precision]
    for tile in tiles:
        if triton.cdiv(rows, tile[0]) * triton.cdiv(n_out, tile[1]) >= _MIN_PROGRAMS:
            return tile
    return tiles[-1]


def _launch(x, weight, bias, num_rows, activation, residual, out, pre=None, zero_dead=False):
    """``out`` (and GELU's input ``x @ weight.T + bias`` into ``pre``, if given) at the live rows;
    with ``zero_dead`` zeros at the other rows of ``out`` (the backward's dX)."""
    rows, k_dim = x.shape
    n_out = weight.shape[0]
    if out.numel() == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = _config(rows, n_out, x.dtype)
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


@torch.library.custom_op("recvit::prefix_linear_triton", mutates_args=())
def _prefix_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      num_rows: torch.Tensor, activation: Optional[str],
                      residual: Optional[torch.Tensor], grad: bool) -> list[torch.Tensor]:
    """``[out]``, a new (R, N_out) result, its rows past M unwritten; with ``grad`` (autograd
    records the call) zero there, and with GELU ``[out, pre]``: GELU's input (R, N_out) at the live
    rows too (its other rows unwritten), for the backward (what the eager GELU keeps, too)."""
    out = new_output((x.shape[0], weight.shape[0]), x, grad)
    if not (grad and activation == "gelu"):
        return [_launch(x, weight, bias, num_rows, activation, residual, out)]
    pre = torch.empty_like(out)
    return [_launch(x, weight, bias, num_rows, activation, residual, out, pre), pre]


@_prefix_linear_op.register_fake
def _(x, weight, bias, num_rows, activation, residual, grad):
    return [x.new_empty((x.shape[0], weight.shape[0])) for _ in range(2 if grad and activation == "gelu" else 1)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_rows, activation, residual, grad = inputs
    ctx.save_for_backward(x, weight, num_rows, output[1] if len(output) == 2 else None)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # GELU's input has no gradient: no zeros for it


def _backward(ctx, grad_outputs):
    x, weight, num_rows, pre = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_weight = needs[1] or needs[2]
    # the op returns the gradients asked for, in this order
    grads = iter(call_op(
        backward_kernels.prefix_linear_backward, grad_outputs[0], x, weight, num_rows, pre, ctx.has_bias,
        needs_x=needs[0], needs_weight=needs_weight, needs_residual=needs[5]))
    dx = next(grads) if needs[0] else None
    dweight = next(grads) if needs_weight else None
    dbias = next(grads) if needs_weight and ctx.has_bias else None
    dresidual = next(grads) if needs[5] else None
    return (dx, dweight if needs[1] else None, dbias if needs[2] else None, None, None, dresidual, None)


_prefix_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("recvit::prefix_linear_triton_", mutates_args=("out",))
def _prefix_linear_inplace_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              num_rows: torch.Tensor, activation: Optional[str],
                              residual: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """The live rows written into ``out`` in place (inference only: no autograd)."""
    _launch(x, weight, bias, num_rows, activation, residual, out)


def _supports(x, weight, bias, num_rows, activation, residual):
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        reason = None if tensor is None else device_reason(name, tensor)
        if reason is not None:
            return reason
    return None


@register("prefix_linear", "triton", supports=_supports)
def prefix_linear_triton(x, weight, bias, num_rows, activation, residual, out=None):
    """Triton version of :func:`recvit_kernels.prefix_linear`."""
    if out is not None:  # in place: inference only (the front-end refuses it under autograd)
        call_op(_prefix_linear_inplace_op, x, weight, bias, num_rows, activation, residual, out)
        return out
    return call_op(_prefix_linear_op, x, weight, bias, num_rows, activation, residual,
                   records_grad(x, weight, bias, residual))[0]
