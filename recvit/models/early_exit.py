"""Early-exit ViT: a DeiT/ViT whose L blocks run with per-token depth from a ranker.

patch embedding + [CLS] + learned positions -> ranker (per-token depth d in 1..L) -> the L distinct
blocks (:class:`recvit.DepthAdaptiveBlocks`: a token of depth d runs blocks 1..d and keeps its state
after; [CLS] runs all L) -> final norm -> classifier on [CLS]. With every depth L it is the dense
model. The ranker, the output (:class:`recvit.RecViTOutput`), the losses (:class:`recvit.EdgeRecViTLoss`)
and the backends are Edge-RecViT's; only the layers differ (L distinct blocks instead of head, shared
and tail). ``mlp_hidden_dim`` and ``mlp_activation`` are Edge-RecViT's too: the MLP width of a source
whose width is no ``int(embed_dim * mlp_ratio)``, and "gelu" (exact) or "relu".

The state-dict keys are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.*``,
``norm``, ``head``) plus ``ranker.*``, so a DeiT checkpoint loads unchanged (:func:`recvit.load_checkpoint`
maps Hugging Face names too); :func:`from_vit` wraps a built timm or Hugging Face ViT.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .edge_recvit import RANKERS, EdgeRecViT, _init_weights
from .layers import MLP_ACTIVATIONS, Block, add_token_embedding, check_positive_int
from .recursion import DepthAdaptiveBlocks
from .registry import register_model


class EarlyExitViT(nn.Module):
    """A ViT with per-token early exit; the module docstring says what it computes."""

    # The embedding, the forward and the depth-override check are Edge-RecViT's: they read
    # ``recursion``, here the L blocks.
    embed = EdgeRecViT.embed
    forward = EdgeRecViT.forward
    _check_depth_override = EdgeRecViT._check_depth_override

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_steps: int = 12, qkv_bias: bool = True, eps: float = 1e-6,
                 kv: str = "active", backend: Optional[str] = None, ranker: str = "earr",
                 mlp_hidden_dim: Optional[int] = None, mlp_activation: str = "gelu"):
        super().__init__()
        if ranker not in RANKERS:
            raise ValueError(f"ranker={ranker!r}: expected one of {tuple(RANKERS)}")
        num_steps = check_positive_int("num_steps", num_steps)  # the number of blocks
        self.num_steps, self.num_classes, self.embed_dim = num_steps, num_classes, embed_dim
        add_token_embedding(self, img_size, patch_size, in_chans, embed_dim)
        self.ranker = RANKERS[ranker](embed_dim, num_steps)
        self.blocks = DepthAdaptiveBlocks([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps, mlp_hidden_dim,
                                                 mlp_activation) for _ in range(num_steps)], kv, backend)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def recursion(self) -> DepthAdaptiveBlocks:
        """The L blocks under the name Edge-RecViT's code paths use (forward, FLOPs, CUDA graphs)."""
        return self.blocks


def from_vit(vit: nn.Module, ranker: str = "earr", kv: str = "active",
             backend: Optional[str] = None) -> EarlyExitViT:
    """An :class:`EarlyExitViT` with the weights of ``vit`` (copied; ``vit`` is untouched) and a new
    ``ranker`` ("earr" or "public_3layer", initialised, to be trained with :class:`recvit.EdgeRecViTLoss`).

    ``vit``: a timm ``VisionTransformer`` with class-token pooling (DeiT, ViT), or a Hugging Face
    ``ViTForImageClassification`` / ``ViTModel``. The MLP width is the source's (any width) and its
    activation exact GELU or ReLU (timm's ``nn.GELU()`` or own ``GELU`` / ``nn.ReLU``, Hugging Face's ``hidden_act``
    "gelu" / "relu"). Refused with a ValueError naming what does not fit: distillation or register
    tokens, average pooling, layer scale, qk-norm, a pre-norm, a gated MLP (timm's ``SwiGLU``,
    ``GluMlp`` / ``SwiGLUPacked``), another activation (tanh GELU, "gelu_new").
    """
    config = _hf_config(vit) if hasattr(vit, "config") else _timm_config(vit)
    model = EarlyExitViT(**config, kv=kv, backend=backend, ranker=ranker)
    from ..checkpoint import convert_state_dict

    converted = convert_state_dict(vit.state_dict(), model, source="hf" if hasattr(vit, "config") else "timm")
    model.load_state_dict(converted.state_dict, strict=False)
    weight = next(vit.parameters())
    return model.to(device=weight.device, dtype=weight.dtype).train(vit.training)


def _timm_config(vit: nn.Module) -> dict:
    parts = [getattr(vit, name, None) for name in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")]
    if not isinstance(vit, nn.Module) or any(part is None for part in parts) or not hasattr(vit.patch_embed, "proj"):
        raise TypeError(f"vit: expected a timm VisionTransformer (patch_embed.proj, cls_token, pos_embed, "
                        f"blocks, norm, head) or a Hugging Face ViT, got {type(vit).__name__}")
    unsupported = [what for what, present in (
        ("a distillation token (distilled DeiT)", getattr(vit, "dist_token", None) is not None),
        ("register tokens", getattr(vit, "reg_token", None) is not None),
        (f"global_pool={getattr(vit, 'global_pool', 'token')!r} (class-token pooling only)",
         getattr(vit, "global_pool", "token") != "token"),
        ("no_embed_class", getattr(vit, "no_embed_class", False)),
        ("a pre-norm (norm_pre)", not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity)),
        ("an fc_norm", not isinstance(getattr(vit, "fc_norm", nn.Identity()), nn.Identity)),
    ) if present]
    if unsupported:
        raise ValueError(f"vit: {', '.join(unsupported)}: not supported")
    proj, first, head = vit.patch_embed.proj, vit.blocks[0], getattr(vit, "head", nn.Identity())
    grid = vit.pos_embed.shape[1] - 1
    side = round(grid ** 0.5)
    mlp_hidden_dim, mlp_activation = _timm_mlp(first.mlp)
    return dict(img_size=side * proj.kernel_size[0], patch_size=proj.kernel_size[0], in_chans=proj.in_channels,
                num_classes=head.out_features if isinstance(head, nn.Linear) else 0, embed_dim=proj.out_channels,
                num_heads=first.attn.num_heads, mlp_hidden_dim=mlp_hidden_dim, mlp_activation=mlp_activation,
                num_steps=len(vit.blocks), qkv_bias=first.attn.qkv.bias is not None, eps=vit.norm.eps)


def _timm_mlp(mlp: nn.Module) -> tuple:
    """(hidden width, activation) of timm's plain ``Mlp``, fc1 -> act -> fc2; a ValueError naming any
    other MLP type, such as a gated one (``SwiGLU``: no fc1; ``GluMlp``: fc2 takes half of fc1's width)."""
    fc1, act, fc2 = (getattr(mlp, name, None) for name in ("fc1", "act", "fc2"))
    if not (isinstance(fc1, nn.Linear) and isinstance(act, nn.Module) and isinstance(fc2, nn.Linear)
            and fc2.in_features == fc1.out_features):
        raise ValueError(f"vit: the MLP {type(mlp).__name__} (blocks.0.mlp): only a plain MLP, fc1 -> activation "
                         f"-> fc2 (timm's Mlp), is supported, not a gated one (timm's SwiGLU, GluMlp, SwiGLUPacked)")
    return fc1.out_features, _timm_activation(act)


def _timm_activation(act: nn.Module) -> str:
    """The :class:`recvit.models.layers.Mlp` activation that computes timm's ``mlp.act`` exactly, told
    by its values on an fp64 probe rather than its class: torch's ``nn.GELU()`` and timm's own
    ``GELU`` (what ``act_layer="gelu"`` builds) are both the exact GELU; ``nn.ReLU`` is ReLU."""
    probe = torch.linspace(-8, 8, 129, dtype=torch.float64)  # past 6: ReLU6 is no ReLU
    try:
        with torch.no_grad():
            values = act(probe.clone())
    except (RuntimeError, TypeError):  # an activation with parameters of another dtype or device: none of ours
        values = None
    for name, exact in (("gelu", F.gelu), ("relu", F.relu)):
        if isinstance(values, torch.Tensor) and torch.equal(values, exact(probe)):
            return name
    raise ValueError(f"vit: the MLP activation {act!r}: only the exact GELU (nn.GELU(), timm's GELU) and ReLU "
                     f"are supported")


def _hf_config(vit: nn.Module) -> dict:
    config = vit.config
    if getattr(config, "model_type", None) != "vit":
        raise ValueError(f"vit: a Hugging Face model of type {getattr(config, 'model_type', None)!r}; "
                         f"expected a ViT (model_type 'vit')")
    activation = getattr(config, "hidden_act", "gelu")
    if activation not in MLP_ACTIVATIONS:  # Hugging Face's "gelu" is the exact (erf) GELU
        raise ValueError(f"vit: hidden_act {activation!r}: only {' and '.join(map(repr, MLP_ACTIVATIONS))} "
                         f"are supported")
    classifier = getattr(vit, "classifier", None)
    return dict(img_size=config.image_size, patch_size=config.patch_size, in_chans=config.num_channels,
                num_classes=classifier.out_features if isinstance(classifier, nn.Linear) else 0,
                embed_dim=config.hidden_size, num_heads=config.num_attention_heads,
                mlp_hidden_dim=config.intermediate_size, mlp_activation=activation,
                num_steps=config.num_hidden_layers, qkv_bias=config.qkv_bias, eps=config.layer_norm_eps)


@register_model
def deit_tiny_early_exit(**overrides) -> EarlyExitViT:
    return EarlyExitViT(**{"embed_dim": 192, "num_heads": 3, **overrides})


@register_model
def deit_small_early_exit(**overrides) -> EarlyExitViT:
    return EarlyExitViT(**{"embed_dim": 384, "num_heads": 6, **overrides})


@register_model
def deit_base_early_exit(**overrides) -> EarlyExitViT:
    return EarlyExitViT(**{"embed_dim": 768, "num_heads": 12, **overrides})
