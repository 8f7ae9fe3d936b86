"""A minimal DeiT/ViT in timm's structure and state-dict key names (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``,
``norm``, ``head``), written here from the ViT definition with no recvit code: the dense reference
the early-exit model must equal at full depth, where timm itself may not be installed.
"""
import torch
import torch.nn as nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act_layer=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmGELU(nn.Module):
    """timm's own ``GELU`` (``timm.layers.activations``; what ``act_layer="gelu"`` builds): the exact
    GELU, ``F.gelu``, but no ``nn.GELU``."""

    def __init__(self, inplace=False):
        super().__init__()

    def forward(self, x):
        return nn.functional.gelu(x)


class GluMlp(nn.Module):
    """timm's gated ``GluMlp``: ``fc1`` gives the value and the gate halves (the gate first if not
    ``gate_last``), ``fc2`` takes half its width. timm's ``SwiGLUPacked`` is it with ``nn.SiLU`` and
    ``gate_last=False`` (a ViT's ``act_layer`` replaces the SiLU unless it is given too)."""

    def __init__(self, dim, hidden, act_layer=nn.Sigmoid, gate_last=True):
        super().__init__()
        self.gate_last = gate_last
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden // 2, dim)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(x1 * self.act(x2) if self.gate_last else self.act(x1) * x2)


def SwiGLUPacked(dim, hidden, act_layer=nn.SiLU):
    return GluMlp(dim, hidden, act_layer, gate_last=False)


class SwiGLU(nn.Module):
    """timm's ``SwiGLU``: separate gate and value projections ``fc1_g`` / ``fc1_x``, no ``fc1``."""

    def __init__(self, dim, hidden, act_layer=nn.SiLU):
        super().__init__()
        self.fc1_g, self.fc1_x = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.act, self.fc2 = act_layer(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1_g(x)) * self.fc1_x(x))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, mlp_hidden_dim=None, act_layer=nn.GELU,
                 mlp_layer=Mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio) if mlp_hidden_dim is None else mlp_hidden_dim, act_layer)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` with class-token pooling (DeiT), no dropout; ``mlp_hidden_dim`` and
    ``act_layer`` as timm's ``Mlp`` takes them (``hidden_features``, ``act_layer``), ``mlp_layer`` as
    timm's (:class:`Mlp`, :class:`GluMlp`, :func:`SwiGLUPacked`, :class:`SwiGLU`)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, mlp_hidden_dim=None, act_layer=nn.GELU, mlp_layer=Mlp):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, mlp_hidden_dim, act_layer,
                                            mlp_layer) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, images):
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
