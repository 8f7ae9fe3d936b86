"""recvit_kernels: the ops behind recursive ViTs with token-level dynamic depth.

One public function per op, each with an eager PyTorch implementation and, where installed,
``triton`` and ``cuda`` ones; see :mod:`recvit_kernels._backend` for how a backend is chosen.
This package knows nothing of models.
"""
from ._backend import (AUTO_ORDER, BACKENDS, available_backends, register, register_availability,
                       resolve_backend, unavailable_reason)
from .depth_sort import DepthLayout, check_depths, depth_sort, pack, unpack
from .layer_norm import layer_norm
from .mlp import mlp
from .prefix_linear import prefix_linear
from .varlen_attention import varlen_attention

__all__ = [
    "AUTO_ORDER", "BACKENDS", "DepthLayout", "available_backends", "check_depths", "depth_sort",
    "layer_norm", "mlp", "pack", "prefix_linear", "register", "register_availability",
    "resolve_backend", "unavailable_reason", "unpack", "varlen_attention",
]
