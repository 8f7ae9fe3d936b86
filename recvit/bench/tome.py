"""ToMe: token merging on the dense DeiT (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023),
the training-free speed-up a user would try instead of a dynamic-depth model.

In every layer, between the attention and the MLP, r tokens are merged away by *bipartite soft
matching*: the tokens are split alternately into sets A (even positions) and B (odd positions);
each token of A draws an edge to its most similar token of B (cosine similarity of the attention
keys, averaged over the heads); the r edges of highest similarity are kept and each of their A
tokens is merged into its B token by an average weighted by the token *sizes* (how many patches a
token stands for). [CLS] (position 0, in A) is never merged. Attention is *proportional*:
``softmax(q k^T * scale + log s)`` with s the key sizes, so a merged token weighs as much as the
tokens it replaced. r is capped at (N - 1) // 2 (A has at most that many tokens besides [CLS]).

Written from the paper; :class:`ToMe` runs on the weights of a :class:`~recvit.bench.DeiTDense`.
:func:`tome_flops` counts its FLOPs in recvit.flops' conventions, :func:`choose_r` picks the r
whose FLOPs are closest to a target (Edge-RecViT's).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.layers import Block
from .baselines import DeiTDense


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """The merge of one ToMe step for tokens with features ``metric`` (B, N, D); [CLS] at position 0.

    Returns ``merge(x, reduce)``: (B, N, C) -> (B, N - r, C): the A tokens left unmerged (in their
    original order, so [CLS] stays first), then the B tokens, each reduced (``"sum"`` or
    ``"mean"``) with the A tokens merged into it.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric: expected shape (batch, tokens, dim), got {tuple(metric.shape)}")
    if not 0 <= r <= (metric.shape[1] - 1) // 2:
        raise ValueError(f"r: expected 0 <= r <= (tokens - 1) // 2 = {(metric.shape[1] - 1) // 2}, got {r}")
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)                   # (B, |A|, |B|) cosine similarities
    scores[:, 0, :] = -torch.inf                     # [CLS] is never merged
    best, best_b = scores.max(dim=-1)                # each A token's edge
    order = best.argsort(dim=-1, descending=True)[..., None]
    kept = order[:, r:].sort(dim=1).values           # unmerged A tokens, original order
    merged = order[:, :r]                            # the r A tokens merged away
    into = best_b[..., None].gather(1, merged)       # ... and the B token each goes into

    def merge(x: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        batch, _, dim = x.shape
        unmerged = src.gather(1, kept.expand(batch, -1, dim))
        moved = src.gather(1, merged.expand(batch, -1, dim))
        dst = dst.scatter_reduce(1, into.expand(batch, -1, dim), moved, reduce=reduce)
        return torch.cat([unmerged, dst], dim=1)

    return merge


def merge_wavg(merge: Callable, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (B, N, C) tokens ``x`` of sizes (B, N, 1): size-weighted averages, sizes added."""
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def proportional_attention(block: Block, x: torch.Tensor, size: Optional[torch.Tensor]):
    """The attention branch of ``block`` on (B, N, C) with the keys weighted by ``size`` (B, N, 1)
    (None: all 1). Returns (output before the residual add, keys averaged over heads (B, N, D))."""
    attn = block.attn
    batch, tokens, dim = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)  # (B, 1, 1, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(batch, tokens, dim)), k.mean(1)


class ToMe(nn.Module):
    """``deit`` with ``r`` tokens merged per layer (module docstring); shares deit's weights."""

    def __init__(self, deit: DeiTDense, r: int):
        super().__init__()
        if r < 0:
            raise ValueError(f"r: expected a number of tokens >= 0, got {r}")
        self.deit, self.r = deit, r

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.deit.embed(images)
        size = None
        for block in self.deit.blocks:
            out, keys = proportional_attention(block, x, size)
            x = x + out
            r = min(self.r, (x.shape[1] - 1) // 2)
            if r > 0:
                if size is None:
                    size = torch.ones_like(x[..., :1])
                x, size = merge_wavg(bipartite_soft_matching(keys, r), x, size)
            x = x + block.mlp(block.norm2(x))
        return self.deit.head(self.deit.norm(x)[:, 0])


def token_counts(tokens: int, depth: int, r: int) -> list[int]:
    """Tokens entering each of the ``depth`` layers (N0 = ``tokens`` into the first)."""
    counts = [tokens]
    for _ in range(depth - 1):
        counts.append(counts[-1] - min(r, (counts[-1] - 1) // 2))
    return counts


def tome_flops(deit: DeiTDense, r: int) -> float:
    """FLOPs per image of ToMe(deit, r), recvit.flops' conventions (1 MAC = 2 FLOPs; norms, softmax,
    the size bias and the classifier ignored). A layer entering with N tokens and merging r_l:
    attention 2 (4 N C^2 + 2 N^2 C), matching 2 |A| |B| D (A, B = the even/odd halves, D the head
    dim: the keys averaged over heads), MLP 4 (N - r_l) C H."""
    proj = deit.patch_embed.proj
    c, n0 = proj.out_channels, deit.pos_embed.shape[1]
    hidden = deit.blocks[0].mlp.fc1.out_features
    head_dim = deit.blocks[0].attn.head_dim
    total = 2.0 * (n0 - 1) * proj.in_channels * proj.kernel_size[0] ** 2 * c
    for n in token_counts(n0, len(deit.blocks), r):
        merged = min(r, (n - 1) // 2)
        total += 2.0 * (4.0 * n * c * c + 2.0 * n * n * c)
        total += 2.0 * ((n + 1) // 2) * (n // 2) * head_dim if merged else 0.0
        total += 4.0 * (n - merged) * c * hidden
    return total


def choose_r(deit: DeiTDense, target_flops: float) -> int:
    """The r whose :func:`tome_flops` is closest to ``target_flops`` (ties: the smaller r)."""
    n0 = deit.pos_embed.shape[1]
    return min(range(0, (n0 - 1) // 2 + 1), key=lambda r: (abs(tome_flops(deit, r) - target_flops), r))
