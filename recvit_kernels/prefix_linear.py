"""A linear layer on the live row prefix, with the live row count read from device memory.

``prefix_linear(x, weight, bias, num_rows)`` computes, for the rows ``r < M`` of ``x`` (R, K) with
``M = num_rows[0]`` (a 1-element integer tensor on x's device, e.g. ``layout.step_rows[l-1:l]``):
``act(x[r] @ weight.T + bias) + residual[r]``, with ``weight`` (N_out, K), ``bias`` (N_out,) or None,
``activation`` None or ``"gelu"`` (exact, erf) and ``residual`` (R, N_out) or None (an M past R
acts as R). M is never read back to the host, so the call is free of host syncs and its launch
shape depends only on R (CUDA-graph capture).

Rows ``r >= M`` are neither read nor written: in a new result they are unspecified; with ``out``
(an (R, N_out) tensor of x's dtype, e.g. the residual stream itself) the live rows are written
into it in place and its other rows keep their values, which is how the sync-free path keeps the
exited tokens' states without copying them. ``out`` is for inference: it is refused when autograd
would need the overwritten values. It must not overlap itself or a tensor the op reads (programs
would overwrite rows that others still read), except that it may be ``residual`` itself.

The ``eager`` / ``packed`` implementation computes every row and zeroes those past M (sync-free
but as costly as a full linear); the ``triton`` one does the GEMM work, and the stores, of the
live rows only. Gradients treat the rows past M as constants (zero gradient), as the eager
definition does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import dispatch, register
from ._checks import check_floating, check_out_apart, check_tensor

ACTIVATIONS = (None, "gelu")


def prefix_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  num_rows: torch.Tensor, activation: Optional[str] = None,
                  residual: Optional[torch.Tensor] = None, *, out: Optional[torch.Tensor] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``act(x @ weight.T + bias) [+ residual]`` on rows ``< num_rows[0]`` (into ``out`` if given)."""
    check_tensor("x", x, 2)
    check_floating("x", x)
    check_tensor("weight", weight, 2, x.dtype, x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight: expected (out_features, {x.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1, x.dtype, x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_tensor("num_rows", num_rows, 1, (torch.int32, torch.int64), x.device)
    if num_rows.numel() != 1:
        raise ValueError(f"num_rows: expected 1 element, got shape {tuple(num_rows.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    if residual is not None:
        check_tensor("residual", residual, 2, x.dtype, x.device)
        if residual.shape != (x.shape[0], weight.shape[0]):
            raise ValueError(f"residual: expected {(x.shape[0], weight.shape[0])}, "
                             f"got {tuple(residual.shape)}")
    if out is not None:
        check_tensor("out", out, 2, x.dtype, x.device)
        if out.shape != (x.shape[0], weight.shape[0]) or out.stride(1) != 1:
            raise ValueError(f"out: expected {(x.shape[0], weight.shape[0])} with unit column stride, "
                             f"got shape {tuple(out.shape)} strides {out.stride()}")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, residual, out)):
            raise ValueError("out: writing in place is for inference; call without out (or under "
                             "torch.no_grad()) when inputs require grad")
        check_out_apart(out, dict(x=x, weight=weight, bias=bias, num_rows=num_rows, residual=residual),
                        may_be="residual")
    args = (x, weight, bias, num_rows, activation, residual)
    return dispatch("prefix_linear", backend, *args)(*args, out=out)


def _prefix_linear_eager(x, weight, bias, num_rows, activation, residual, out=None):
    result = F.linear(x, weight, bias)
    if activation == "gelu":
        result = F.gelu(result)
    if residual is not None:
        result = result + residual
    live = torch.arange(x.shape[0], device=x.device)[:, None] < num_rows
    if out is None:  # the rows past M, unspecified by the contract, are zero here
        return torch.where(live, result, result.new_zeros(()))
    return out.copy_(torch.where(live, result, out))


register("prefix_linear", "eager")(_prefix_linear_eager)
register("prefix_linear", "packed")(_prefix_linear_eager)
