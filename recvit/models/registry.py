"""Model registry: ``create_model(name, **overrides)`` in timm's manner. Edge-RecViT's models are
registered here; MoR-ViT's and the early-exit DeiT's in their own modules."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .edge_recvit import EdgeRecViT

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``; keyword ``overrides`` replace its default settings."""
    if name not in _MODELS:
        raise ValueError(f"name={name!r}: unknown model; expected one of {list_models()}")
    return _MODELS[name](**overrides)


@register_model
def edge_recvit_tiny(**overrides) -> EdgeRecViT:
    return EdgeRecViT(**{"embed_dim": 192, "num_heads": 3, **overrides})


@register_model
def edge_recvit_small(**overrides) -> EdgeRecViT:
    return EdgeRecViT(**{"embed_dim": 384, "num_heads": 6, **overrides})


@register_model
def edge_recvit_base(**overrides) -> EdgeRecViT:
    return EdgeRecViT(**{"embed_dim": 768, "num_heads": 12, **overrides})
