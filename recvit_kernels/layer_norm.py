"""LayerNorm over rows, with the residual add fused in (flash-attention's ``layer_norm`` convention).

``layer_norm(x, weight, bias, eps)`` normalises the last dimension of ``x`` (rows, C).
With ``residual`` given it first forms ``s = x + residual`` and returns ``(layer_norm(s), s)``, so
a pre-norm block computes its second norm and keeps the new residual stream in one pass.

With ``num_rows`` (a 1-element integer tensor on x's device, read there, never on the host) only
the rows ``r < num_rows[0]`` of the 2-D ``x`` are normalised (the live prefix of the sync-free
path); the outputs' other rows are unspecified: the triton and cuda kernels neither read nor write
them (their work follows the live count), the eager one computes every row. Gradients follow:
the triton backward reads and reduces the live rows only and gives the rows past ``num_rows[0]``
a zero gradient (their outputs are constants to it), where the eager one differentiates every row.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import dispatch, register
from ._checks import check_floating, check_tensor


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-6,
               residual: Optional[torch.Tensor] = None, *, num_rows: Optional[torch.Tensor] = None,
               backend: Optional[str] = None):
    """LayerNorm of ``x`` (or of ``x + residual``, returned alongside) over its last dimension."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x: expected a tensor with a feature dimension")
    check_floating("x", x)
    if not eps >= 0:  # NaN too
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    width = x.shape[-1]
    parameters = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    for name, parameter in parameters.items():
        check_tensor(name, parameter, 1, device=x.device)
        check_floating(name, parameter)
        if parameter.shape[0] != width:
            raise ValueError(f"{name}: expected ({width},), got {tuple(parameter.shape)}")
    if residual is not None:
        check_tensor("residual", residual, x.dim(), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {tuple(x.shape)} like x, got {tuple(residual.shape)}")
    if num_rows is not None:
        if x.dim() != 2:
            raise ValueError(f"x: with num_rows expected (rows, C), got shape {tuple(x.shape)}")
        check_tensor("num_rows", num_rows, 1, (torch.int32, torch.int64), x.device)
        if num_rows.numel() != 1:
            raise ValueError(f"num_rows: expected 1 element, got shape {tuple(num_rows.shape)}")
    implementation = dispatch("layer_norm", backend, x, weight, bias, eps, residual)
    return implementation(x, weight, bias, eps, residual, num_rows=num_rows)


def _layer_norm_eager(x, weight, bias, eps, residual, num_rows=None):
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    summed = x + residual
    return F.layer_norm(summed, (x.shape[-1],), weight, bias, eps), summed


register("layer_norm", "eager")(_layer_norm_eager)
register("layer_norm", "packed")(_layer_norm_eager)
