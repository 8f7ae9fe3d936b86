"""The transformer MLP over rows: ``fc2(gelu(fc1(x)))``, plus ``residual`` when given.

``x`` is (rows, C); ``fc1_weight`` (hidden, C), ``fc1_bias`` (hidden,), ``fc2_weight`` (C_out, hidden),
``fc2_bias`` (C_out,). GELU is the exact (erf) one, as in timm's ``Mlp``. With ``out`` (a
(rows, C_out) tensor of x's dtype with unit column stride, e.g. the rows being updated; inference
only) the result is written into it in place; it must not overlap itself or an input, except that
it may be ``residual`` itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import dispatch, register
from ._checks import check_floating, check_out_apart, check_tensor


def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
        fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
        residual: Optional[torch.Tensor] = None, *, out: Optional[torch.Tensor] = None,
        backend: Optional[str] = None) -> torch.Tensor:
    """``residual + fc2(gelu(fc1(x)))`` (``residual`` optional) over the rows of ``x``."""
    check_tensor("x", x, 2)
    check_floating("x", x)
    for name, weight in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        check_tensor(name, weight, 2, device=x.device)
        check_floating(name, weight)
    if fc1_weight.shape[1] != x.shape[1]:
        raise ValueError(f"fc1_weight: expected (hidden, {x.shape[1]}), got {tuple(fc1_weight.shape)}")
    if fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(f"fc2_weight: expected (out, {fc1_weight.shape[0]}), "
                         f"got {tuple(fc2_weight.shape)}")
    for name, bias, weight in (("fc1_bias", fc1_bias, fc1_weight), ("fc2_bias", fc2_bias, fc2_weight)):
        if bias is None:
            continue
        check_tensor(name, bias, 1, device=x.device)
        check_floating(name, bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{name}: expected ({weight.shape[0]},), got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor("residual", residual, 2, device=x.device)
        if residual.shape != (x.shape[0], fc2_weight.shape[0]):
            raise ValueError(f"residual: expected {(x.shape[0], fc2_weight.shape[0])}, "
                             f"got {tuple(residual.shape)}")
    if out is not None:
        check_tensor("out", out, 2, x.dtype, x.device)
        if out.shape != (x.shape[0], fc2_weight.shape[0]) or out.stride(1) != 1:
            raise ValueError(f"out: expected {(x.shape[0], fc2_weight.shape[0])} with unit column "
                             f"stride, got shape {tuple(out.shape)} strides {out.stride()}")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
                x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, out)):
            raise ValueError("out: writing in place is for inference; call without out (or under "
                             "torch.no_grad()) when inputs require grad")
        check_out_apart(out, dict(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                                  fc2_bias=fc2_bias, residual=residual), may_be="residual")
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    return dispatch("mlp", backend, *args)(*args, out=out)


def _mlp_eager(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, out=None):
    result = F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    result = result if residual is None else result + residual
    return result if out is None else out.copy_(result)


register("mlp", "eager")(_mlp_eager)
register("mlp", "packed")(_mlp_eager)
