"""Transformer building blocks with timm's parameter names (``norm1``, ``attn.qkv``, ``attn.proj``,
``norm2``, ``mlp.fc1``, ``mlp.fc2``), so DeiT/ViT checkpoints map onto them key for key.

``Block.forward`` is the dense pre-norm layer on (B, N, C) with an optional key mask (the eager
reference). ``Block.forward_packed`` runs the same layer on the active prefix of the depth-sorted
rows through the ``recvit_kernels`` ops; ``Block.forward_static`` runs it on the static B*N rows
with the active count kept on the device (no host sync), computing the live rows only.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import recvit_kernels as rk

KV_MODES = ("active", "all")
MLP_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def check_kv(kv: str) -> str:
    if kv not in KV_MODES:
        raise ValueError(f"kv={kv!r}: expected one of {KV_MODES}")
    return kv


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def square_size(img_size) -> int:
    """``img_size`` as one side: an int, or an (H, W) pair with H == W (only square inputs are supported)."""
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise ValueError(f"img_size={img_size!r}: only square images are supported: give one int "
                             f"(or an (H, W) pair with H == W)")
        img_size = img_size[0]
    return check_positive_int("img_size", img_size)


class PatchEmbed(nn.Module):
    """Image (B, 3, S, S) -> patch tokens (B, (S // p)^2, C) by a stride-p convolution.

    An ``img_size`` S that is not a multiple of ``patch_size`` p leaves the last S % p pixel rows
    and columns unread, as timm's ``PatchEmbed`` and the public Edge-RecViT code's convolution do.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        img_size = square_size(img_size)
        patch_size, in_chans, embed_dim = (check_positive_int(name, value) for name, value in (
            ("patch_size", patch_size), ("in_chans", in_chans), ("embed_dim", embed_dim)))
        if patch_size > img_size:
            raise ValueError(f"patch_size={patch_size!r}: expected an int in 1..img_size={img_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans, self.img_size, self.img_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected shape (batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got {shape}")
        if images.shape[0] == 0:
            raise ValueError(f"images: expected at least one image, got an empty batch {tuple(images.shape)}")
        if not images.dtype.is_floating_point:
            raise ValueError(f"images: expected a floating dtype, got {images.dtype}")
        weight = self.proj.weight
        if images.dtype != weight.dtype and not torch.is_autocast_enabled(images.device.type):
            raise ValueError(f"images: dtype {images.dtype} differs from the model's {weight.dtype}: convert "
                             f"the images (images.to({weight.dtype})) or the model (model.to({images.dtype}))")
        if images.device != weight.device:
            raise ValueError(f"images: on {images.device}, the model on {weight.device}: move one of them")
        return self.proj(images).flatten(2).transpose(1, 2)


def add_token_embedding(model: nn.Module, img_size, patch_size: int, in_chans: int, embed_dim: int) -> None:
    """Give ``model`` a ViT's token embedding under timm's names: ``patch_embed``, ``cls_token``
    (1, 1, C) and ``pos_embed`` (1, N, C) (zeros; the model initialises them), and ``num_tokens`` N =
    patches + 1."""
    model.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
    model.num_tokens = model.patch_embed.num_patches + 1
    model.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    model.pos_embed = nn.Parameter(torch.zeros(1, model.num_tokens, embed_dim))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide dim={dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; ``activation`` "gelu" (exact, erf: timm's and the fused kernels') or
    "relu" (what the public Edge-RecViT code applies for any ``hidden_act`` but "gelu")."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: expected one of {tuple(MLP_ACTIVATIONS)}")
        self.activation = activation
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), MLP_ACTIVATIONS[activation](), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm1(x))``, then ``+ mlp(norm2(.))``.

    The MLP is ``int(dim * mlp_ratio)`` wide (timm's rule) unless ``mlp_hidden_dim`` gives the
    width; ``mlp_activation`` "gelu" or "relu" (see :class:`Mlp`). ReLU runs unfused on the kernel
    backends (their MLP epilogues fuse GELU only): fc1, ReLU, then fc2 with the residual.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6, mlp_hidden_dim: Optional[int] = None, mlp_activation: str = "gelu"):
        super().__init__()
        dim = check_positive_int("dim", dim)
        if mlp_hidden_dim is None and (isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real)
                                       or not math.isfinite(mlp_ratio) or int(dim * mlp_ratio) < 1):
            raise ValueError(f"mlp_ratio={mlp_ratio!r}: expected a number > 0 giving an MLP of at least one "
                             f"unit (int(dim * mlp_ratio) >= 1, dim = {dim})")
        if mlp_hidden_dim is not None and (isinstance(mlp_hidden_dim, bool) or not isinstance(mlp_hidden_dim, int)
                                           or mlp_hidden_dim < 1):
            raise ValueError(f"mlp_hidden_dim={mlp_hidden_dim!r}: expected a positive int (or None: "
                             f"int(dim * mlp_ratio))")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"eps={eps!r}: expected a number >= 0 (LayerNorm's epsilon)")
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio) if mlp_hidden_dim is None else mlp_hidden_dim, mlp_activation)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense layer on (B, N, C); ``key_mask`` (B, N) bool restricts the keys every query sees."""
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))

    def forward_packed(self, rows: torch.Tensor, layout: rk.DepthLayout, step: int, num_rows: int,
                       kv: str = "active", backend: Optional[str] = None,
                       max_active: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer on the active prefix ``rows[:num_rows]`` of the depth-sorted (B*N, C) buffer.

        Returns the new (num_rows, C) prefix. With ``kv="all"`` the keys and values of every row,
        exited ones included, are computed from their frozen states. ``max_active`` bounds the
        active tokens of any one image at this step (default: all N, a static bound). With ``out``
        ((num_rows, C), inference only; ``rows[:num_rows]`` itself is fine) the MLP's last
        epilogue writes the new prefix there.
        """
        return self._forward_rows(rows, layout, step, num_rows, kv, backend, max_active, None, out)

    def forward_static(self, rows: torch.Tensor, layout: rk.DepthLayout, step: int, kv: str = "active",
                       backend: Optional[str] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer on the B*N depth-sorted rows, M = ``layout.step_rows[step - 1]`` kept on the device.

        Returns (B*N, C) whose first M rows are the update and whose other rows are unspecified;
        with ``out`` (inference only; ``rows`` itself is fine) the M updated rows are written into
        ``out`` in place by the last GEMM's epilogue and ``out`` is returned, its other rows
        untouched. No host sync and static shapes (CUDA-graph capture); on the triton backend every
        kernel reads M (or the per-image lengths) on the device and works on the live rows only.
        """
        return self._forward_rows(rows, layout, step, rows.shape[0], kv, backend, None,
                                  layout.step_rows[step - 1:step], out)

    def _forward_rows(self, rows, layout, step, num_rows, kv, backend, max_active, live, out=None):
        """The layer on ``rows[:num_rows]``: plain GEMMs, or with ``live`` (a 1-element device
        count) kernels that compute, and write, only the rows below it.

        Attention reads every step's rows from one table, ``layout.image_order`` with the static
        starts b*N and the used lengths ``layout.image_lengths[step - 1]``.
        """
        linear = F.linear if live is None else functools.partial(rk.prefix_linear, num_rows=live,
                                                                 backend=backend)
        # The parameters in the rows' dtype: themselves, unless RecursiveBlock runs the steps in
        # autocast's dtype (then a differentiable cast, as autocast makes for F.linear).
        norm1_weight, norm1_bias = _params(self.norm1, rows.dtype)
        qkv_weight, qkv_bias = _params(self.attn.qkv, rows.dtype)
        proj_weight, proj_bias = _params(self.attn.proj, rows.dtype)
        norm2_weight, norm2_bias = _params(self.norm2, rows.dtype)
        fc1_weight, fc1_bias = _params(self.mlp.fc1, rows.dtype)
        fc2_weight, fc2_bias = _params(self.mlp.fc2, rows.dtype)
        attn, heads, head_dim = self.attn, self.attn.num_heads, self.attn.head_dim
        dim = rows.shape[1]
        prefix = rows[:num_rows]
        starts, used = layout.all_rows_cu_seqlens(), layout.image_lengths[step - 1]
        tokens = layout.tokens
        max_active = tokens if max_active is None else max_active
        if kv == "active":
            normed = rk.layer_norm(prefix, norm1_weight, norm1_bias, self.norm1.eps, num_rows=live,
                                   backend=backend)
            q, k, v = linear(normed, qkv_weight, qkv_bias).view(num_rows, 3, heads, head_dim).unbind(1)
            used_keys, max_keys = used, max_active
        else:  # the keys of every token, exited ones from their frozen states
            normed_all = rk.layer_norm(rows, norm1_weight, norm1_bias, self.norm1.eps, backend=backend)
            q = linear(normed_all[:num_rows], qkv_weight[:dim],
                       None if qkv_bias is None else qkv_bias[:dim]).view(num_rows, heads, head_dim)
            k, v = F.linear(normed_all, qkv_weight[dim:], None if qkv_bias is None else qkv_bias[dim:]).view(
                rows.shape[0], 2, heads, head_dim).unbind(1)
            used_keys, max_keys = None, tokens
        attended = rk.varlen_attention(q, k, v, starts, starts, max_active, max_keys, attn.scale,
                                       q_rows=layout.image_order, kv_rows=layout.image_order,
                                       seqused_q=used, seqused_k=used_keys, backend=backend)
        projected = linear(attended.reshape(num_rows, dim), proj_weight, proj_bias)
        normed2, residual = rk.layer_norm(projected, norm2_weight, norm2_bias, self.norm2.eps,
                                          residual=prefix, num_rows=live, backend=backend)
        if self.mlp.activation == "relu":  # unfused: the kernels' epilogues fuse GELU only
            hidden = F.relu(linear(normed2, fc1_weight, fc1_bias))
            if live is not None:
                return linear(hidden, fc2_weight, fc2_bias, residual=residual, out=out)
            updated = F.linear(hidden, fc2_weight, fc2_bias) + residual
            return updated if out is None else out.copy_(updated)
        if live is None:
            return rk.mlp(normed2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=residual, out=out,
                          backend=backend)
        hidden = linear(normed2, fc1_weight, fc1_bias, activation="gelu")
        return linear(hidden, fc2_weight, fc2_bias, residual=residual, out=out)


def _params(module: nn.Module, dtype: torch.dtype):
    """(weight, bias or None) of a Linear or LayerNorm in ``dtype`` (the tensors themselves if they
    already are: checked here, a ``.to`` call costs ~1 µs of host time, 12 a step)."""
    weight, bias = module.weight, module.bias
    if weight.dtype == dtype and (bias is None or bias.dtype == dtype):
        return weight, bias
    return weight.to(dtype), None if bias is None else bias.to(dtype)
