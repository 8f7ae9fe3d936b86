"""The baselines the benchmark times beside ours: the dense DeiT (eager or in a CUDA graph) and
Edge-RecViT run per step the ways one would write it without recvit's layout (gather/scatter into a
padded batch, nested jagged tensors + SDPA, torch's ``varlen_attn``). ToMe is in :mod:`.tome`.

Every Edge-RecViT variant here is ``fn(images, depths) -> logits`` and computes what
``model(images, depths=depths, backend="eager")`` computes (tests/test_bench.py checks it).
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.edge_recvit import EdgeRecViT, _init_weights
from ..models.layers import Block, PatchEmbed


class Unavailable(Exception):
    """An implementation cannot run in this setting; the message says why."""


class DeiTDense(nn.Module):
    """A plain pre-norm ViT (DeiT) of the same scale: patch embed + [CLS] + positions, ``depth``
    :class:`~recvit.models.layers.Block` layers with SDPA, final norm, classifier on [CLS]."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_classes: int = 1000,
                 embed_dim: int = 768, num_heads: int = 12, depth: int = 12, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N0, C): [CLS] then the patch tokens, plus the positions."""
        patches = self.patch_embed(images)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], 1) + self.pos_embed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def dense_flops(deit: DeiTDense) -> float:
    """FLOPs per image of the dense model in recvit.flops' conventions (1 MAC = 2 FLOPs; norms,
    softmax, biases, classifier ignored): patch + depth x (8 N C^2 + 4 N^2 C + 4 N C H)."""
    proj = deit.patch_embed.proj
    c, n0 = proj.out_channels, deit.pos_embed.shape[1]
    hidden = deit.blocks[0].mlp.fc1.out_features
    patch = 2.0 * (n0 - 1) * proj.in_channels * proj.kernel_size[0] ** 2 * c
    return patch + len(deit.blocks) * (8.0 * n0 * c * c + 4.0 * n0 * n0 * c + 4.0 * n0 * c * hidden)


def capture_graph(fn: Callable[[torch.Tensor], torch.Tensor], example_images: torch.Tensor,
                  warmup: int = 3):
    """``fn(images)`` (a dense model: DeiT, ToMe) captured in one CUDA graph for the example's shape,
    so batch-1 latency compares graphs on both sides. Returns ``graphed(images, depths=None)``."""
    if example_images.device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA GPU")
    from ..models.graph import GraphedForward, capture

    static = example_images.clone()
    graph, logits = capture(lambda: fn(static), static.device, warmup)
    graphed = GraphedForward(graph, static, None, logits)
    return lambda images, depths=None: graphed(images)


# ----------------------------------------------------------------------------------------------
# Edge-RecViT run per step without recvit's layout


def recvit_forward(model: EdgeRecViT, images: torch.Tensor, depths: Optional[torch.Tensor],
                   run_step: Callable) -> torch.Tensor:
    """Edge-RecViT's forward with the recursion replaced: ``run_step(layer, x, active) -> x``."""
    tokens = model.embed(images)
    ranked = model.ranker(tokens)[2]
    if depths is None:
        depths = ranked.clone()
        depths[:, 0] = model.num_steps
    x = tokens
    for step in range(1, model.num_steps + 1):
        active = depths >= step
        x = run_step(model.recursion.layer_for_step(step), x, active)
    return model.head(model.norm(x)[:, 0])


def gather_scatter_step(layer, x, active):
    """Per image, gather the active tokens into a padded batch, run the layer, index_copy back."""
    batch, tokens, dim = x.shape
    lengths = active.sum(1)
    width = int(lengths.max())
    if width == 0:
        return x
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :width]  # active first
    gathered = x.gather(1, order[..., None].expand(-1, -1, dim))
    valid = torch.arange(width, device=x.device) < lengths[:, None]
    out = layer(gathered, valid | ~valid.any(1, keepdim=True))
    flat = (order + tokens * torch.arange(batch, device=x.device)[:, None])[valid]
    return x.reshape(-1, dim).index_copy(0, flat, out[valid]).view(batch, tokens, dim)


def _layer_on_rows(block: Block, rows: torch.Tensor, attend: Callable) -> torch.Tensor:
    """The pre-norm layer on packed (T, C) rows; ``attend(q, k, v, scale)`` on (T, H, D) mixes images."""
    attn = block.attn
    total, dim = rows.shape
    qkv = attn.qkv(block.norm1(rows)).view(total, 3, attn.num_heads, attn.head_dim)
    q, k, v = (t.contiguous() for t in qkv.unbind(1))
    rows = rows + attn.proj(attend(q, k, v, attn.scale).reshape(total, dim))
    return rows + block.mlp(block.norm2(rows))


def packed_step(attend_factory):
    """Per step: index_select the active tokens (image-major), run the layer on them with the
    given varlen attention ``attend_factory(offsets, lengths)``, index_copy them back."""

    def step(layer, x, active):
        batch, tokens, dim = x.shape
        index = active.reshape(-1).nonzero().squeeze(1)
        if index.numel() == 0:
            return x
        lengths = active.sum(1)
        offsets = F.pad(lengths.cumsum(0), (1, 0))
        flat = x.reshape(-1, dim)
        rows = _layer_on_rows(layer, flat.index_select(0, index), attend_factory(offsets, lengths))
        return flat.index_copy(0, index, rows).view(batch, tokens, dim)

    return step


def nested_attend(offsets, lengths):
    """Attention over image segments through nested jagged tensors and SDPA."""
    warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")

    def attend(q, k, v, scale):
        nested = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*nested, scale=scale)
        return out.transpose(1, 2).values()

    return attend


def scaled_varlen_call(varlen_attn: Callable) -> Callable:
    """``call(q, k, v, cu_q, cu_k, max_q, max_k, scale)`` for the ``varlen_attn`` of this torch.

    Its signature changed between releases: torch 2.10 has ``(..., max_q, max_k, is_causal=False,
    return_aux=None)`` and no ``scale`` (the softmax scale is 1/sqrt(head_dim)); later releases
    take keyword-only ``return_aux``, ``scale``, ``window_size`` and more. So the signature is read,
    not assumed: where ``scale`` is a parameter it is passed by name; where not, q is multiplied by
    ``scale * sqrt(head_dim)``, which gives the same scores. Nothing is passed positionally past
    ``max_k`` (in 2.10 the next positional slot is ``is_causal``).
    """
    try:
        parameters = inspect.signature(varlen_attn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: assume the old form
        parameters = {}
    takes_scale = "scale" in parameters and \
        parameters["scale"].kind is not inspect.Parameter.POSITIONAL_ONLY

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        if takes_scale:
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)
        return varlen_attn(q * (scale * math.sqrt(q.shape[-1])), k, v, cu_q, cu_k, max_q, max_k)

    return call


def varlen_attn_attend(offsets, lengths):
    """Attention over image segments through ``torch.nn.attention.varlen.varlen_attn``."""
    from torch.nn.attention.varlen import varlen_attn

    call = scaled_varlen_call(varlen_attn)
    cu = offsets.to(torch.int32)
    longest = int(lengths.max())

    def attend(q, k, v, scale):
        return call(q, k, v, cu, cu, longest, longest, scale)

    return attend


def probe(attend_factory, device, dtype) -> Optional[str]:
    """None if the attention runs on a tiny two-image input here, else why not."""
    q = torch.randn(5, 2, 64, device=device, dtype=dtype)
    lengths = torch.tensor([2, 3], device=device)
    try:
        attend_factory(F.pad(lengths.cumsum(0), (1, 0)), lengths)(q, q, q, 0.125)
    except Exception as error:  # the reason is what we report
        return f"{type(error).__name__}: {first_line(error)}"
    return None


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]
