"""Depth profiles: how many of an image's tokens are still active at each recursion step.

A profile fixes alpha_l = N_l / N0 (the fraction of the N0 tokens active at step l); the benchmark
draws per-token depths that follow it, placing the depths at random positions in each image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

# The paper's depth profile (supplement eq. 17: sum alpha_l = 8.21, sum alpha_l^2 = 6.64, L = 12).
# The paper does not print its histogram; this one is ours: N_l, the active tokens of a 224x224
# image (N0 = 197, [CLS] included) at steps 1..12. No token exits before step 4, then about 20
# tokens leave per step and 35 run all 12 steps. alpha_l = N_l / 197 gives sum 8.2081 and
# sum of squares 6.6439, i.e. 8.21 and 6.64 to two decimals.
PAPER_ACTIVE_TOKENS_224 = (197, 197, 197, 197, 173, 154, 134, 114, 93, 73, 53, 35)
PAPER_ALPHA = tuple(n / 197 for n in PAPER_ACTIVE_TOKENS_224)
PROFILES = ("paper", "uniform", "all-shallow", "all-deep", "ranker")


def profile_alpha(profile: str, num_steps: int) -> Optional[tuple[float, ...]]:
    """alpha_l (fraction of an image's tokens active at step l) of a named profile; None = ranker."""
    if profile == "paper":
        if num_steps != len(PAPER_ALPHA):
            raise ValueError(f"profile='paper' is defined for L = 12, got num_steps={num_steps}")
        return PAPER_ALPHA
    if profile == "uniform":  # depths spread evenly over 1..L
        return tuple((num_steps - l + 1) / num_steps for l in range(1, num_steps + 1))
    if profile == "all-shallow":  # every patch token exits after step 1; [CLS] runs all steps
        return (1.0,) + (0.0,) * (num_steps - 1)
    if profile == "all-deep":
        return (1.0,) * num_steps
    if profile == "ranker":
        return None
    raise ValueError(f"profile={profile!r}: expected one of {PROFILES}")


def active_counts(alpha: Sequence[float], tokens: int) -> list[int]:
    """Per-step active-token counts N_l = round(alpha_l * N0), non-increasing, N_1 = N0, N_L >= 1."""
    counts = [tokens] + [max(1, min(tokens, round(a * tokens))) for a in alpha[1:]]
    for i in range(1, len(counts)):
        counts[i] = min(counts[i], counts[i - 1])
    return counts


def profile_depths(profile: str, batch: int, tokens: int, num_steps: int,
                   generator: torch.Generator) -> Optional[torch.Tensor]:
    """(batch, tokens) int64 depths on the CPU following ``profile``; None for ``ranker``.

    Every image gets the profile's active counts; which patch tokens get which depth is drawn
    at random per image. [CLS] (column 0) always gets depth L.
    """
    alpha = profile_alpha(profile, num_steps)
    if alpha is None:
        return None
    counts = active_counts(alpha, tokens) + [0]
    per_depth = [counts[d - 1] - counts[d] for d in range(1, num_steps + 1)]  # tokens of depth d
    values = torch.repeat_interleave(torch.arange(1, num_steps + 1), torch.tensor(per_depth))
    values = values.flip(0)  # depth L first: [CLS] takes one of them
    depths = torch.empty(batch, tokens, dtype=torch.int64)
    for b in range(batch):
        depths[b, 0] = values[0]
        depths[b, 1:] = values[1:][torch.randperm(tokens - 1, generator=generator)]
    return depths


def alpha_sums(depths: torch.Tensor, num_steps: int) -> tuple[float, float]:
    """(mean over images of sum alpha_l, of sum alpha_l^2) realised by a (B, N0) depth map."""
    steps = torch.arange(1, num_steps + 1, device=depths.device)
    alpha = (depths[:, :, None] >= steps).double().mean(1)
    return float(alpha.sum(1).mean()), float((alpha ** 2).sum(1).mean())


