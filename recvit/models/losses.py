"""The training objectives. Edge-RecViT's: L = L_CCE + lambda_stb * L_stb + lambda_du * L_du.

The [CLS] token does not take part in ranking, so every term averages over the patch tokens only
(columns 1.. of the (B, N, ...) ranker outputs), pooled over the batch.

- STB: mean over tokens of (logsumexp_l z_il)^2.
- DU:  L * sum_l E_l A_l, with E_l the mean depth probability and A_l the fraction of tokens whose
       depth is l; equal to 1 when both are uniform.
- CCE: cross-entropy of the logits scaled by each image's mean confidence.

MoR-ViT's (:class:`MoRViTLoss`): CE + lambda_z * router z-loss + lambda_balance * balancing loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from recvit_kernels._checks import values_checkable

from .edge_recvit import RecViTOutput
from .mor_vit import MoRViTOutput


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


def check_class_targets(output: RecViTOutput, target) -> None:
    """``target`` must hold one class index per image: integer (B,) in 0..classes-1 on the logits'
    device (the range is checked where values are checkable); and ``output`` must carry gradients
    when they are enabled here (a forward under ``torch.no_grad`` cannot be trained on)."""
    logits = output.logits
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor of class indices, got {type(target).__name__}")
    batch, classes = logits.shape
    if target.is_floating_point() or target.dtype == torch.bool:
        hint = " (one-hot or probabilities: pass target.argmax(1))" if target.dim() == 2 else ""
        raise ValueError(f"target: expected integer class indices of shape ({batch},), got dtype "
                         f"{target.dtype}{hint}")
    if tuple(target.shape) != (batch,):
        hint = " (one-hot: pass target.argmax(1))" if target.dim() == 2 and target.shape[1] == classes else ""
        raise ValueError(f"target: expected shape ({batch},), one class index per image, got "
                         f"{tuple(target.shape)}{hint}")
    if target.device != logits.device:
        raise ValueError(f"target: on {target.device}, the logits on {logits.device}: move one of them")
    if values_checkable(target):
        low, high = target.min().item(), target.max().item()
        if low < 0 or high >= classes:
            raise ValueError(f"target: class indices must lie in 0..{classes - 1} (the model has {classes} "
                             f"classes), got values in {low}..{high}")
    if torch.is_grad_enabled() and not logits.requires_grad:
        raise ValueError("output: computed without gradients (a forward under torch.no_grad() or "
                         "torch.inference_mode()), so this loss cannot be backpropagated: run the forward "
                         "with gradients to train, or compute the loss under torch.no_grad() too")


def check_loss_weights(**weights: float) -> None:
    """Each loss weight must be a finite number >= 0; ``label_smoothing``, if given, at most 1 too."""
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r}: expected a finite number >= 0")
    if weights.get("label_smoothing", 0) > 1:
        raise ValueError(f"label_smoothing={weights['label_smoothing']!r}: expected a number in [0, 1]")


@dataclass
class EdgeRecViTLosses:
    total: torch.Tensor
    cce: torch.Tensor
    stb: torch.Tensor
    du: torch.Tensor


class EdgeRecViTLoss(nn.Module):
    """Combines the three terms from a :class:`recvit.RecViTOutput` and class targets (B,);
    ``label_smoothing`` applies to the CCE term. Targets are checked (:func:`check_class_targets`),
    and so is an output without gradients while gradients are enabled (a forward under ``no_grad``)."""

    def __init__(self, lambda_stb: float = 1e-3, lambda_du: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        check_loss_weights(lambda_stb=lambda_stb, lambda_du=lambda_du, label_smoothing=label_smoothing)
        self.lambda_stb, self.lambda_du, self.label_smoothing = lambda_stb, lambda_du, label_smoothing

    def forward(self, output, target: torch.Tensor) -> EdgeRecViTLosses:
        if not isinstance(output, RecViTOutput):
            raise TypeError(f"output: expected the RecViTOutput of model(images, return_aux=True) (the loss "
                            f"needs the depths and the ranker's probabilities), got {type(output).__name__}")
        if isinstance(output, MoRViTOutput):
            raise TypeError("output: a MoRViTOutput: MoR-ViT's objective is recvit.MoRViTLoss")
        check_class_targets(output, target)
        cce = cce_loss(output.logits, output.confidence[:, 1:], target, self.label_smoothing)
        stb = stb_loss(output.depth_logits[:, 1:])
        du = du_loss(output.depth_probs[:, 1:], output.depths[:, 1:])
        return EdgeRecViTLosses(cce + self.lambda_stb * stb + self.lambda_du * du, cce, stb, du)


@dataclass
class MoRViTLosses:
    total: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor
    balance: torch.Tensor


def router_z_loss(output: MoRViTOutput) -> torch.Tensor:
    """Router z-loss over the patch tokens (columns 1..), pooled over the batch.

    expert choice: mean of ``z^2`` over every scored (token, step) logit (the log-sum-exp of a
    router's single logit is the logit itself). token choice: mean over tokens of
    ``(logsumexp_l z_l)^2`` (MoR's token-choice z-loss; the same formula as Edge-RecViT's STB).
    """
    logits = output.depth_logits[:, 1:].float()
    if output.routing == "token_choice":
        return stb_loss(logits)
    scored = output.scored[:, 1:]
    return torch.where(scored, logits, 0.0).pow(2).sum() / scored.sum()


def balancing_loss(output: MoRViTOutput) -> torch.Tensor:
    """Balancing loss over the patch tokens (columns 1..), pooled over the batch.

    token choice: ``L * sum_l P_l A_l`` with ``P_l`` the mean over tokens of the router's normalised
    preference ``sigmoid(z_l) / sum_l' sigmoid(z_l')`` and ``A_l`` the fraction of tokens of depth l;
    1 when both are uniform (MoR's balancing loss, Edge-RecViT's DU).
    expert choice: beta already fixes how many tokens reach each depth, so the balancing term is MoR's
    expert-choice auxiliary loss: the mean binary cross-entropy of ``sigmoid(z_l)`` against "kept at
    step l" (depth >= l) over the tokens step l >= 2 ranked (depth >= l - 1); it pulls the scores of
    kept tokens above 1/2 and of exiting tokens below.
    """
    depths = output.depths[:, 1:]
    logits = output.depth_logits[:, 1:].float()
    if output.routing == "token_choice":
        probs = torch.sigmoid(logits)
        return du_loss(probs / probs.sum(-1, keepdim=True), depths)
    steps = torch.arange(1, logits.shape[-1] + 1, device=logits.device)
    ranked = (steps >= 2) & (depths[..., None] >= steps - 1)
    kept = (depths[..., None] >= steps).float()
    bce = F.binary_cross_entropy_with_logits(torch.where(ranked, logits, 0.0), kept, reduction="none")
    return torch.where(ranked, bce, 0.0).sum() / ranked.sum().clamp_min(1)


class MoRViTLoss(nn.Module):
    """``CE(logits, target) + lambda_z * z-loss + lambda_balance * balancing loss``.

    Defaults follow the weights the Edge-RecViT/MoR recipes give their router regularisers
    (1e-3 for the logit-size term, 0.1 for the balancing term); MoR-ViT leaves them tunable.
    """

    def __init__(self, lambda_z: float = 1e-3, lambda_balance: float = 0.1):
        super().__init__()
        check_loss_weights(lambda_z=lambda_z, lambda_balance=lambda_balance)
        self.lambda_z, self.lambda_balance = lambda_z, lambda_balance

    def forward(self, output: MoRViTOutput, target: torch.Tensor) -> MoRViTLosses:
        if not isinstance(output, MoRViTOutput):
            raise TypeError(f"output: expected a MoRViTOutput (model(images, return_aux=True)), "
                            f"got {type(output).__name__}")
        check_class_targets(output, target)
        ce = F.cross_entropy(output.logits.float(), target)
        z, balance = router_z_loss(output), balancing_loss(output)
        return MoRViTLosses(ce + self.lambda_z * z + self.lambda_balance * balance, ce, z, balance)
