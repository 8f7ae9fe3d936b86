"""FLOPs and parameter accounting for Edge-RecViT, as in the paper's supplement (section 3).

Conventions: 1 MAC = 2 FLOPs; biases, softmax, normalisation layers, the GELU and the classifier
head are ignored. With C the width, H the MLP hidden width (4C in the papers), N_l the active
tokens of an image at step l and N0 = P + 1 the tokens of an image (P patches and [CLS]):

- patch embedding: 2 * P * in_chans * p^2 * C               (eq. 11)
- ranker (EARR):   2 * N0 * (C * 2C + 2C * L)               (eq. 12)
- attention, step l, ``kv="active"``: 2 * (4 N_l C^2 + 2 N_l^2 C)   (eq. 8: Q, K, V, output
  projections of the active tokens; scores and weighted values over the active tokens)
- attention, step l, ``kv="all"``: 2 * (2 N_l C^2 + 2 N0 C^2 + 2 N_l N0 C)   (Q and output
  projections of the active tokens, K and V of all N0 tokens, active queries against all N0 keys);
  counted only at steps where the image has an active token
- MLP, step l: 2 * 2 N_l C H                                (eq. 9, = 2 * 8 N_l C^2 for H = 4C)

From a depth profile with alpha_l = N_l / N0 only the sums S1 = sum alpha_l and S2 = sum alpha_l^2
matter (eq. 16): attention = 8 N0 C^2 S1 + 4 N0^2 C S2, MLP = 4 N0 C H S1.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn as nn

import recvit_kernels as rk

from .layers import check_kv

PARAMS_CONVENTION = ("every parameter except the classifier head: patch embedding, [CLS], positions, "
                     "ranker, the head/shared/tail layers and the final norm")


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs per image, by component (floats; ``blocks`` = attention + MLP)."""

    patch_embed: float
    ranker: float
    attention: float
    mlp: float
    total: float

    @property
    def blocks(self) -> float:
        return self.attention + self.mlp

    def gflops(self) -> dict[str, float]:
        """The components (and ``blocks``) in GFLOPs."""
        values = {field.name: getattr(self, field.name) / 1e9 for field in fields(self)}
        values["blocks"] = self.blocks / 1e9
        return values


@dataclass(frozen=True)
class _Dims:
    tokens: int        # N0 = P + 1
    patches: int       # P
    in_chans: int
    patch_size: int
    dim: int           # C
    hidden: int        # H, the MLP hidden width
    num_steps: int     # L
    ranker_hidden: int  # 2C in the paper
    kv: str


def _dims(model: nn.Module) -> _Dims:
    missing = [name for name in ("patch_embed", "ranker", "recursion") if not hasattr(model, name)]
    if missing:
        raise TypeError(f"model: expected an Edge-RecViT-style model (patch_embed, ranker, recursion), "
                        f"{type(model).__name__} lacks {missing}")
    proj = model.patch_embed.proj
    recursion = model.recursion
    layer = recursion.head_layer
    return _Dims(tokens=model.patch_embed.num_patches + 1, patches=model.patch_embed.num_patches,
                 in_chans=proj.in_channels, patch_size=proj.kernel_size[0], dim=proj.out_channels,
                 hidden=layer.mlp.fc1.out_features, num_steps=recursion.num_steps,
                 ranker_hidden=model.ranker.fc1.out_features, kv=recursion.kv)


def _fixed_flops(d: _Dims) -> tuple[float, float]:
    """(patch embedding, ranker) FLOPs per image: eqs. 11 and 12."""
    patch = 2.0 * d.patches * d.in_chans * d.patch_size ** 2 * d.dim
    ranker = 2.0 * d.tokens * (d.dim * d.ranker_hidden + d.ranker_hidden * d.num_steps)
    return patch, ranker


def _breakdown(d: _Dims, attention: float, mlp: float) -> FlopsBreakdown:
    patch, ranker = _fixed_flops(d)
    return FlopsBreakdown(patch, ranker, attention, mlp, patch + ranker + attention + mlp)


def count_flops(model: nn.Module, depths: torch.Tensor, kv: Optional[str] = None) -> FlopsBreakdown:
    """Mean FLOPs per image of ``model`` run with ``depths`` (B, N0) in 1..L, [CLS] included.

    The per-step active-token counts are taken from ``depths`` (e.g. ``RecViTOutput.depths``).
    ``kv`` ("active" or "all") defaults to the model's setting; see the module docstring.
    """
    d = _dims(model)
    kv = check_kv(kv or d.kv)
    rk.check_depths(depths, d.num_steps)
    if depths.shape[1] != d.tokens or depths.shape[0] == 0:
        raise ValueError(f"depths: expected shape (batch >= 1, {d.tokens}), got {tuple(depths.shape)}")
    steps = torch.arange(1, d.num_steps + 1, device=depths.device)
    active = (depths[:, :, None] >= steps).sum(1).to(torch.float64)  # (B, L): N_l per image
    batch, c, h, n0 = depths.shape[0], float(d.dim), float(d.hidden), float(d.tokens)
    if kv == "active":
        attention = 2.0 * (4.0 * c * c * active + 2.0 * c * active ** 2)
    else:
        attention = 2.0 * (2.0 * c * c * active + 2.0 * c * c * n0 * (active > 0) + 2.0 * c * n0 * active)
    mlp = 4.0 * c * h * active
    return _breakdown(d, float(attention.sum()) / batch, float(mlp.sum()) / batch)


def check_alpha_sums(alpha_sums: Sequence[float], num_steps: int) -> tuple[float, float]:
    """Validate (sum alpha_l, sum alpha_l^2) of a depth profile with alpha_1 = 1 and 0 <= alpha_l <= 1.

    Feasible exactly when 1 <= S1 <= L and 1 + (S1 - 1)^2 / (L - 1) <= S2 <= S1 (the upper bound is
    the one that holds for profiles averaged over images).
    """
    if len(alpha_sums) != 2:
        raise ValueError(f"alpha_sums: expected two numbers (sum alpha_l, sum alpha_l^2), got {alpha_sums!r}")
    s1, s2 = (float(value) for value in alpha_sums)
    tol = 1e-9
    if not 1.0 - tol <= s1 <= num_steps + tol:
        raise ValueError(f"alpha_sums: sum alpha_l = {s1:g} must lie in [1, L = {num_steps}] "
                         f"(alpha_1 = 1, every alpha_l <= 1)")
    low = 1.0 + (s1 - 1.0) ** 2 / (num_steps - 1)
    if not low - tol <= s2 <= s1 + tol:
        raise ValueError(f"alpha_sums: with sum alpha_l = {s1:g} and L = {num_steps}, sum alpha_l^2 must lie "
                         f"in [{low:.4f}, {s1:g}], got {s2:g}")
    return s1, s2


def profile_flops(model: nn.Module, alpha_sums: Sequence[float]) -> FlopsBreakdown:
    """FLOPs per image from a depth profile's (sum alpha_l, sum alpha_l^2), supplement eqs. 16-19.

    This is the paper's ``kv="active"`` accounting, whatever the model's ``kv`` setting.
    """
    d = _dims(model)
    s1, s2 = check_alpha_sums(alpha_sums, d.num_steps)
    c, h, n0 = float(d.dim), float(d.hidden), float(d.tokens)
    attention = 8.0 * n0 * c * c * s1 + 4.0 * n0 * n0 * c * s2
    mlp = 4.0 * n0 * c * h * s1
    return _breakdown(d, attention, mlp)


def full_depth_flops(model: nn.Module) -> FlopsBreakdown:
    """FLOPs per image with every token at depth L (EARR disabled): supplement eqs. 13-14."""
    num_steps = _dims(model).num_steps
    return profile_flops(model, (num_steps, num_steps))


def count_params(model: nn.Module, include_head: bool = False) -> int:
    """Number of parameters; by default without the classifier head, which reproduces the papers'
    Params column (1.6 / 6.0 / 23.2 M for Tiny / Small / Base): see :data:`PARAMS_CONVENTION`.
    """
    head = getattr(model, "head", None)
    excluded = set() if include_head or head is None else {id(p) for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)
