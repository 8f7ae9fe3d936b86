"""Edge-RecViT's training objective: L = L_CCE + lambda_stb * L_stb + lambda_du * L_du.

The [CLS] token does not take part in ranking, so every term averages over the patch tokens only
(columns 1.. of the (B, N, ...) ranker outputs), pooled over the batch.

- STB: mean over tokens of (logsumexp_l z_il)^2.
- DU:  L * sum_l E_l A_l, with E_l the mean depth probability and A_l the fraction of tokens whose
       depth is l; equal to 1 when both are uniform.
- CCE: cross-entropy of the logits scaled by each image's mean confidence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .edge_recvit import RecViTOutput


def stb_loss(depth_logits: torch.Tensor) -> torch.Tensor:
    """(B, N, L) patch-token depth logits -> squared log-sum-exp, averaged."""
    return torch.logsumexp(depth_logits.float(), dim=-1).pow(2).mean()


def du_loss(depth_probs: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """(B, N, L) probabilities and (B, N) depths in 1..L -> L * sum_l E_l A_l."""
    num_steps = depth_probs.shape[-1]
    expected = depth_probs.reshape(-1, num_steps).float().mean(0)
    actual = F.one_hot(depths.reshape(-1).long() - 1, num_steps).float().mean(0)
    return num_steps * (expected * actual).sum()


def cce_loss(logits: torch.Tensor, confidence: torch.Tensor, target: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, K) scaled by the mean of ``confidence`` (B, N) per image
    (``label_smoothing`` as in :func:`torch.nn.functional.cross_entropy`)."""
    return F.cross_entropy(logits.float() * confidence.float().mean(1, keepdim=True), target,
                           label_smoothing=label_smoothing)


@dataclass
class EdgeRecViTLosses:
    total: torch.Tensor
    cce: torch.Tensor
    stb: torch.Tensor
    du: torch.Tensor


class EdgeRecViTLoss(nn.Module):
    """Combines the three terms from a :class:`recvit.RecViTOutput` and class targets (B,);
    ``label_smoothing`` applies to the CCE term."""

    def __init__(self, lambda_stb: float = 1e-3, lambda_du: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        self.lambda_stb, self.lambda_du, self.label_smoothing = lambda_stb, lambda_du, label_smoothing

    def forward(self, output, target: torch.Tensor) -> EdgeRecViTLosses:
        from .mor_vit import MoRViTOutput

        if not isinstance(output, RecViTOutput):
            raise TypeError(f"output: expected the RecViTOutput of model(images, return_aux=True) (the loss "
                            f"needs the depths and the ranker's probabilities), got {type(output).__name__}")
        if isinstance(output, MoRViTOutput):
            raise TypeError("output: a MoRViTOutput: MoR-ViT's objective is recvit.MoRViTLoss")
        cce = cce_loss(output.logits, output.confidence[:, 1:], target, self.label_smoothing)
        stb = stb_loss(output.depth_logits[:, 1:])
        du = du_loss(output.depth_probs[:, 1:], output.depths[:, 1:])
        return EdgeRecViTLosses(cce + self.lambda_stb * stb + self.lambda_du * du, cce, stb, du)
