"""Edge-RecViT: patch embedding + [CLS] + learned positions -> ranker (per-token depth) ->
recursive block (head, shared x (L-2), tail) -> final norm -> classifier on [CLS].

Two rankers (``EdgeRecViT(ranker=...)``): ``"earr"`` (default), the paper's EARR with two bias-free
linears; ``"public_3layer"``, the router of the public Edge-RecViT code (RicardoLee510520/Edge-RecViT),
three bias-free linears, which its checkpoints need (:func:`recvit.from_pretrained`).
``mlp_hidden_dim`` sets the MLP width where ``int(embed_dim * mlp_ratio)`` cannot (a public config's
``intermediate_size``); ``mlp_activation`` "gelu" (default) or "relu" (the public code's for any
``hidden_act`` but "gelu"), see :class:`recvit.models.layers.Block`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

import recvit_kernels as rk
from recvit_kernels._checks import values_checkable

from .layers import add_token_embedding, check_kv, check_positive_int
from .recursion import RecursiveBlock


@dataclass
class RecViTOutput:
    """What ``model(images, return_aux=True)`` returns.

    logits: (B, classes). depths: (B, N) int64, [CLS] (column 0) included. confidence: (B, N) max
    depth probability. depth_logits / depth_probs: (B, N, L) ranker outputs (for MoR-ViT the router
    scores, see that model). features: (B, N, C) token states after the final norm.
    """

    logits: torch.Tensor
    depths: torch.Tensor
    confidence: torch.Tensor
    depth_logits: torch.Tensor
    depth_probs: torch.Tensor
    features: torch.Tensor


def _rank(logits: torch.Tensor):
    """Depth logits (B, N, L) -> (logits, softmax probabilities, depth = argmax + 1, confidence =
    the chosen depth's probability); the argmax is taken on the logits, as the public code does."""
    probs = logits.float().softmax(-1)
    index = logits.argmax(-1)
    return logits, probs, index + 1, probs.gather(-1, index[..., None])[..., 0]


class EdgeAwareRanker(nn.Module):
    """EARR (the paper's ranker): Linear C->2C, GELU, Linear 2C->L, both without bias; softmax over
    the L depths."""

    def __init__(self, dim: int, num_steps: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, num_steps, bias=False)

    def forward(self, tokens: torch.Tensor):
        """(B, N, C) -> logits (B, N, L), probabilities, depth = argmax + 1, confidence = max prob."""
        return _rank(self.fc2(self.act(self.fc1(tokens))))


class ThreeLayerRanker(nn.Module):
    """The public Edge-RecViT code's router (its ``TokenChoiceRouter``): Linear C->2C, GELU,
    Linear 2C->2C, ReLU, Linear 2C->L, all without bias. Its evaluation path (``training=False``)
    takes depth = argmax + 1 with no sampling and no Gumbel noise, which is what this computes."""

    def __init__(self, dim: int, num_steps: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim, bias=False)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, 2 * dim, bias=False)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(2 * dim, num_steps, bias=False)

    def forward(self, tokens: torch.Tensor):
        """(B, N, C) -> logits (B, N, L), probabilities, depth = argmax + 1, confidence = max prob."""
        return _rank(self.fc3(self.act2(self.fc2(self.act1(self.fc1(tokens))))))


RANKERS = {"earr": EdgeAwareRanker, "public_3layer": ThreeLayerRanker}


class EdgeRecViT(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_steps: int = 12, qkv_bias: bool = True, eps: float = 1e-6,
                 kv: str = "active", backend: Optional[str] = None, ranker: str = "earr",
                 mlp_hidden_dim: Optional[int] = None, mlp_activation: str = "gelu"):
        super().__init__()
        if ranker not in RANKERS:
            raise ValueError(f"ranker={ranker!r}: expected one of {tuple(RANKERS)} ('earr': the paper's "
                             f"two-layer ranker; 'public_3layer': the public code's three-layer router)")
        check_positive_int("num_classes", num_classes, minimum=0)  # 0: no classifier (features only)
        check_positive_int("num_steps", num_steps, minimum=2)  # a head and a tail step
        self.num_steps, self.num_classes, self.embed_dim = num_steps, num_classes, embed_dim
        add_token_embedding(self, img_size, patch_size, in_chans, embed_dim)
        self.ranker = RANKERS[ranker](embed_dim, num_steps)
        self.recursion = RecursiveBlock(embed_dim, num_heads, num_steps, mlp_ratio, qkv_bias, eps, kv,
                                        backend, mlp_hidden_dim, mlp_activation)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, C) tokens: [CLS] then patches, plus learned positions."""
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed

    def forward(self, images: torch.Tensor, depths: Optional[torch.Tensor] = None,
                return_aux: bool = False, kv: Optional[str] = None, backend: Optional[str] = None):
        """Logits (B, classes), or a :class:`RecViTOutput` with ``return_aux=True``.

        ``depths`` (B, N) in 1..L, [CLS] included, overrides the ranker's depths; [CLS] (column
        0) is forced to L there too, as for the ranker's depths (the classifier reads it after the
        tail step). ``kv`` and ``backend`` override the model's settings for this call.
        """
        tokens = self.embed(images)
        depth_logits, depth_probs, ranked, confidence = self.ranker(tokens)
        if depths is None:
            depths = ranked.clone()
        else:
            self._check_depth_override(depths, tokens)
            depths = depths.to(torch.int64, copy=True)
        depths[:, 0] = self.num_steps  # [CLS] always runs every step
        states = self.recursion(tokens, depths, kv=None if kv is None else check_kv(kv), backend=backend)
        features = self.norm(states)
        logits = self.head(features[:, 0])
        if not return_aux:
            return logits
        return RecViTOutput(logits, depths, confidence, depth_logits, depth_probs, features)

    def _check_depth_override(self, depths, tokens):
        if not isinstance(depths, torch.Tensor):
            raise TypeError(f"depths: expected a torch.Tensor, got {type(depths).__name__}")
        if depths.shape != tokens.shape[:2]:
            raise ValueError(f"depths: expected shape {tuple(tokens.shape[:2])} (batch, tokens with "
                             f"[CLS]), got {tuple(depths.shape)}")
        if depths.device != tokens.device:
            raise ValueError(f"depths: expected device {tokens.device}, got {depths.device}")
        if values_checkable(depths):
            rk.check_depths(depths, self.num_steps)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
