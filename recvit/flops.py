"""FLOPs and parameter accounting for Edge-RecViT (the paper's supplement, section 3), MoR-ViT and
the early-exit DeiT/ViT (:class:`recvit.EarlyExitViT`: its L distinct blocks cost per step what
Edge-RecViT's layers do, so the same formulas count it; with every depth L it is the dense model
plus the ranker).

Conventions: 1 MAC = 2 FLOPs; biases, softmax, normalisation layers, the GELU, MoR-ViT's sigmoid
gates and the classifier head are ignored. With C the width, H the MLP hidden width (4C in the
papers), N_l the active tokens of an image at step l and N0 = P + 1 the tokens of an image
(P patches and [CLS]):

- patch embedding: 2 * P * in_chans * p^2 * C               (eq. 11)
- ranker (EARR):   2 * N0 * (C * 2C + 2C * L)               (eq. 12); the public code's
  three-layer ranker: 2 * N0 * (C * 2C + 2C * 2C + 2C * L)
- MoR-ViT router (the ``ranker`` field; one row of ``Linear(C, L)`` per step and token scored):
  token choice scores every token once with all L rows: 2 * N0 * C * L; expert choice scores at
  step 1 every token and at step l >= 2 the N_{l-1} tokens that ran step l-1:
  2 * C * (N0 + N_1 + ... + N_{L-1})
- attention, step l, ``kv="active"``: 2 * (4 N_l C^2 + 2 N_l^2 C)   (eq. 8: Q, K, V, output
  projections of the active tokens; scores and weighted values over the active tokens)
- attention, step l, ``kv="all"``: 2 * (2 N_l C^2 + 2 N0 C^2 + 2 N_l N0 C)   (Q and output
  projections of the active tokens, K and V of all N0 tokens, active queries against all N0 keys);
  counted only at steps where the image has an active token
- MLP, step l: 2 * 2 N_l C H                                (eq. 9, = 2 * 8 N_l C^2 for H = 4C)

From a depth profile with alpha_l = N_l / N0 only the sums S1 = sum alpha_l and S2 = sum alpha_l^2
matter (eq. 16): attention = 8 N0 C^2 S1 + 4 N0^2 C S2, MLP = 4 N0 C H S1. Not so for the router
of an expert-choice MoR-ViT, whose profile is instead fixed by N0 and beta: :func:`expert_choice_flops`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn as nn

import recvit_kernels as rk

from .models.layers import check_kv

PARAMS_CONVENTION = ("every parameter except the classifier head: patch embedding, [CLS], positions, "
                     "ranker (MoR-ViT: router), the head/shared/tail layers (early exit: the L blocks) and the final norm")


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs per image, by component (floats; ``blocks`` = attention + MLP).

    ``ranker`` holds what assigns the depths: Edge-RecViT's EARR ranker or MoR-ViT's routers.
    """

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
    router: str        # "earr" (Edge-RecViT), or MoR-ViT's "expert_choice" / "token_choice"
    ranker_macs: int   # MACs per token of the ranker's linears (EARR: C*2C + 2C*L); 0 for MoR-ViT
    kv: str


def _dims(model: nn.Module) -> _Dims:
    has = [name for name in ("patch_embed", "ranker", "router", "recursion") if hasattr(model, name)]
    if not {"patch_embed", "recursion"} <= set(has) or ("ranker" in has) == ("router" in has):
        raise TypeError(f"model: expected an Edge-RecViT-style model (patch_embed, recursion and a ranker, "
                        f"or MoR-ViT's router), {type(model).__name__} has {has}")
    proj = model.patch_embed.proj
    recursion = model.recursion
    earr = hasattr(model, "ranker")
    return _Dims(tokens=model.patch_embed.num_patches + 1, patches=model.patch_embed.num_patches,
                 in_chans=proj.in_channels, patch_size=proj.kernel_size[0], dim=proj.out_channels,
                 hidden=recursion.layer_for_step(1).mlp.fc1.out_features, num_steps=recursion.num_steps,
                 router="earr" if earr else model.routing,
                 ranker_macs=sum(m.in_features * m.out_features for m in model.ranker.modules()
                                 if isinstance(m, nn.Linear)) if earr else 0, kv=recursion.kv)


def _patch_flops(d: _Dims) -> float:
    """Patch embedding FLOPs per image: eq. 11."""
    return 2.0 * d.patches * d.in_chans * d.patch_size ** 2 * d.dim


def _router_flops(d: _Dims, active: Optional[torch.Tensor]) -> float:
    """Ranker / router FLOPs per image (module docstring); ``active`` (B, L) N_l per image, needed
    for expert choice only (its mean over the images)."""
    if d.router == "earr":  # eq. 12 (the public code's three-layer ranker: one more 2C x 2C linear)
        return 2.0 * d.tokens * d.ranker_macs
    if d.router == "token_choice":
        return 2.0 * d.tokens * d.dim * d.num_steps
    scored = d.tokens + active[:, :-1].sum(1)  # N0 at step 1, N_{l-1} at step l >= 2
    return float((2.0 * d.dim * scored).mean())


def _from_counts(d: _Dims, active: torch.Tensor, kv: str) -> FlopsBreakdown:
    """Mean FLOPs per image from ``active`` (B, L) float64, the N_l of each image."""
    c, h, n0 = float(d.dim), float(d.hidden), float(d.tokens)
    if kv == "active":
        attention = 2.0 * (4.0 * c * c * active + 2.0 * c * active ** 2)
    else:
        attention = 2.0 * (2.0 * c * c * active + 2.0 * c * c * n0 * (active > 0) + 2.0 * c * n0 * active)
    mlp = 4.0 * c * h * active
    batch = active.shape[0]
    return _breakdown(d, float(attention.sum()) / batch, float(mlp.sum()) / batch, _router_flops(d, active))


def _breakdown(d: _Dims, attention: float, mlp: float, router: float) -> FlopsBreakdown:
    patch = _patch_flops(d)
    return FlopsBreakdown(patch, router, attention, mlp, patch + router + attention + mlp)


def count_flops(model: nn.Module, depths: torch.Tensor, kv: Optional[str] = None) -> FlopsBreakdown:
    """Mean FLOPs per image of ``model`` (Edge-RecViT or MoR-ViT) run with ``depths`` (B, N0) in 1..L,
    [CLS] included.

    The per-step active-token counts are taken from ``depths`` (e.g. ``RecViTOutput.depths``; for an
    expert-choice MoR-ViT also the router's, which scores at step l the tokens that ran step l-1).
    ``kv`` ("active" or "all") defaults to the model's setting; see the module docstring.
    """
    d = _dims(model)
    kv = check_kv(d.kv if kv is None else kv)
    rk.check_depths(depths, d.num_steps)
    if depths.shape[1] != d.tokens or depths.shape[0] == 0:
        raise ValueError(f"depths: expected shape (batch >= 1, {d.tokens}), got {tuple(depths.shape)}")
    steps = torch.arange(1, d.num_steps + 1, device=depths.device)
    active = (depths[:, :, None] >= steps).sum(1).to(torch.float64)  # (B, L): N_l per image
    return _from_counts(d, active.cpu(), kv)


def expert_choice_flops(model: nn.Module, kv: Optional[str] = None) -> FlopsBreakdown:
    """FLOPs per image of an expert-choice MoR-ViT: its per-step active counts are fixed by N0 and
    beta (``model.active_counts``), so this is exact for every input. ``kv`` as in :func:`count_flops`."""
    d = _dims(model)
    if d.router != "expert_choice":
        raise ValueError(f"model: expected a MoR-ViT with routing='expert_choice' (the only model whose "
                         f"depth profile is fixed), got {type(model).__name__} with "
                         f"{'an EARR ranker' if d.router == 'earr' else 'routing=' + repr(d.router)}")
    active = torch.tensor([model.active_counts(d.tokens)], dtype=torch.float64)
    return _from_counts(d, active, check_kv(d.kv if kv is None else kv))


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

    This is the paper's ``kv="active"`` accounting, whatever the model's ``kv`` setting. For an
    expert-choice MoR-ViT the sums do not fix the router's FLOPs (and beta fixes the profile):
    ValueError pointing to :func:`expert_choice_flops`.
    """
    d = _dims(model)
    if d.router == "expert_choice":
        raise ValueError(f"alpha_sums: an expert-choice MoR-ViT's depth profile is fixed by N0 and beta "
                         f"(beta = {model.beta:g}) and its router FLOPs depend on more than the two sums; "
                         f"use expert_choice_flops(model), or count_flops(model, depths)")
    s1, s2 = check_alpha_sums(alpha_sums, d.num_steps)
    c, h, n0 = float(d.dim), float(d.hidden), float(d.tokens)
    attention = 8.0 * n0 * c * c * s1 + 4.0 * n0 * n0 * c * s2
    mlp = 4.0 * n0 * c * h * s1
    return _breakdown(d, attention, mlp, _router_flops(d, None))


def full_depth_flops(model: nn.Module) -> FlopsBreakdown:
    """FLOPs per image with every token at depth L (EARR disabled; MoR-ViT: every router scores every
    token at every step, i.e. expert choice with beta -> 0): supplement eqs. 13-14."""
    d = _dims(model)
    return _from_counts(d, torch.full((1, d.num_steps), float(d.tokens), dtype=torch.float64), "active")


def count_params(model: nn.Module, include_head: bool = False) -> int:
    """Number of parameters; by default without the classifier head, which reproduces the papers'
    Params column (1.6 / 6.0 / 23.2 M for Tiny / Small / Base): see :data:`PARAMS_CONVENTION`.
    """
    head = getattr(model, "head", None)
    excluded = set() if include_head or head is None else {id(p) for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)
