"""A linear layer on the live row prefix, with the live row count read from device memory.

``prefix_linear(x, weight, bias, num_rows)`` computes, for the rows ``r < M`` of ``x`` (R, K) with
``M = num_rows[0]`` (a 1-element integer tensor on x's device, e.g. ``layout.step_rows[l-1:l]``):
``act(x[r] @ weight.T + bias) + residual[r]``, with ``weight`` (N_out, K), ``bias`` (N_out,) or None,
``activation`` None or ``"gelu"`` (exact, erf) and ``residual`` (R, N_out) or None. Rows ``r >= M``
of the (R, N_out) result are zero (an M past R acts as R). M is never read back to the host, so
the call is free of host syncs and its launch shape depends only on R (CUDA-graph capture).

The ``eager`` / ``packed`` implementation computes every row and masks the result (sync-free but
as costly as a full linear); the ``triton`` one skips the GEMM work of the row blocks past M.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import dispatch, register
from ._checks import check_tensor

ACTIVATIONS = (None, "gelu")


def prefix_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  num_rows: torch.Tensor, activation: Optional[str] = None,
                  residual: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``act(x @ weight.T + bias) [+ residual]`` on rows ``< num_rows[0]``, zero on the rest."""
    check_tensor("x", x, 2)
    if not x.dtype.is_floating_point:
        raise ValueError(f"x: expected a floating dtype, got {x.dtype}")
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
    args = (x, weight, bias, num_rows, activation, residual)
    return dispatch("prefix_linear", backend, *args)(*args)


def _prefix_linear_eager(x, weight, bias, num_rows, activation, residual):
    out = F.linear(x, weight, bias)
    if activation == "gelu":
        out = F.gelu(out)
    if residual is not None:
        out = out + residual
    live = torch.arange(x.shape[0], device=x.device)[:, None] < num_rows
    return torch.where(live, out, out.new_zeros(()))


register("prefix_linear", "eager")(_prefix_linear_eager)
register("prefix_linear", "packed")(_prefix_linear_eager)
