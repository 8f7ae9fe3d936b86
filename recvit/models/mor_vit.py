"""MoR-ViT: a Vision Transformer with Mixture-of-Recursions routing (token-level dynamic depth).

Patch embedding + [CLS] + learned positions -> L recursion steps over a head layer (step 1), ONE
shared layer (steps 2..L-1) and a tail layer (step L), the "middle-cycle" sharing of the
:class:`recvit.RecursiveBlock` -> final norm -> classifier on [CLS].

Routers. Step l has its own linear router, ``z_l = w_l . h + b_l`` and score ``g_l = sigmoid(z_l)``
(paper sec. 3.4.5); the L routers are the rows of one ``nn.Linear(C, L)``.

Update. A token that runs step l updates as ``h <- h + g_l * f_l(h)`` where ``f_l(h) = layer_l(h) - h``
is the layer's residual branch (attention and MLP increments of the pre-norm layer). We take the
residual branch, not the whole layer output as MoR's language-model code does
(``h + g * layer(h)``), because with g = 1 it is exactly the plain ViT layer: ViT/DeiT checkpoints
then map onto the head/shared/tail layers unchanged, and the state does not grow by (1 + g) per step.

Routing (``routing=``):

- ``"expert_choice"`` (hierarchical top-k). Step 1 runs every token. At step l >= 2 the router scores
  the tokens active at step l-1 and keeps, per image, the patch tokens above the beta-percentile of
  the active patch tokens' scores: exactly ``k = floor((1 - beta) * n)`` of the n active patch tokens,
  ranked by logit (the same order as the sigmoid score, without its saturation ties), ties broken
  by the lower token index. [CLS] is not ranked and always kept. So the active sets are nested and
  the per-image counts depend only on N and beta, never on the data. A token not kept exits: its
  final state is its state before that step's router (the cached pre-router state, sec. 3.4.3),
  i.e. its state after the last step it ran.
- ``"token_choice"``. The L routers score the embedded tokens once: ``z`` (B, N, L); each token's
  depth is ``argmax_l z_l + 1`` and its gate ``g = sigmoid(z_depth)``; [CLS] gets depth L. The
  recursion is then Edge-RecViT's (:class:`recvit.RecursiveBlock` with those depths, its eager and
  packed paths unchanged), every step the token runs updating it as ``h <- h + g * f_l(h)``. The gate
  acts at every step, not once on the finished route as in MoR's language-model code: the classifier
  reads only [CLS], so a patch token's gate reaches the loss only through later attention.

Attention runs over the active tokens only (``kv="active"``); ``kv="all"`` lets active queries
attend to every token, exited ones with their frozen states.

Backends: ``eager`` is the masked reference (every step computes every token, updates gated by the
selection). ``packed``, ``triton``, ``cuda`` and ``auto`` keep the active tokens as a row prefix.
For expert choice each step re-sorts only the active prefix: the kept rows move to the front
(image-major, each image's rows in token order), the rejected ones stay right behind them and never
move again, so the final buffer is in depth-major order. Every step is
:meth:`recvit.models.layers.Block.forward_packed` on that prefix through the ``recvit_kernels`` ops; since
the per-image counts are fixed by N and beta, this path has no host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import recvit_kernels as rk

from .edge_recvit import EdgeRecViT, RecViTOutput, _init_weights
from .registry import register_model
from .layers import add_token_embedding, check_kv, check_positive_int
from .recursion import RecursiveBlock, _write_prefix, kernel_autocast_dtype

ROUTINGS = ("expert_choice", "token_choice")


@dataclass
class MoRViTOutput(RecViTOutput):
    """:class:`recvit.RecViTOutput` of a MoR-ViT, plus what its losses need.

    depths: (B, N) number of steps each token ran (1..L; [CLS] = L).
    confidence: (B, N) the gate g of the last step each token ran (token choice: its route's gate).
    depth_logits: (B, N, L) router logit of step l at column l-1, ``-inf`` where the token was not
        scored (expert choice: step l scores the tokens that ran step l-1, plus every token at step 1).
    depth_probs: (B, N, L) ``sigmoid(depth_logits)``, so 0 where not scored.
    scored: (B, N, L) bool, where the router scored the token.
    routing: ``"expert_choice"`` or ``"token_choice"``.
    """

    scored: torch.Tensor
    routing: str


def kept_count(active: int, beta: float) -> int:
    """Patch tokens kept of ``active`` ones: ``floor((1 - beta) * active)`` (1e-9 absorbs float error)."""
    return math.floor((1.0 - beta) * active + 1e-9)


class MoRViT(nn.Module):
    """MoR-ViT; see the module docstring for the routing, the update and the backends."""

    # The embedding and the depth-override check are Edge-RecViT's (they use the same attributes).
    embed = EdgeRecViT.embed
    _check_depth_override = EdgeRecViT._check_depth_override

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_steps: int = 12, qkv_bias: bool = True, eps: float = 1e-6,
                 routing: str = "expert_choice", beta: float = 0.35, kv: str = "active",
                 backend: Optional[str] = None):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing={routing!r}: expected one of {ROUTINGS}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
            raise ValueError(f"beta={beta!r}: expected a number with 0 < beta < 1")
        self.routing, self.beta = routing, float(beta)
        check_positive_int("num_classes", num_classes, minimum=0)  # 0: no classifier (features only)
        check_positive_int("num_steps", num_steps, minimum=2)  # a head and a tail step
        self.num_steps, self.num_classes, self.embed_dim = num_steps, num_classes, embed_dim
        add_token_embedding(self, img_size, patch_size, in_chans, embed_dim)
        self.router = nn.Linear(embed_dim, num_steps)  # row l-1: the router of step l
        self.recursion = GatedRecursiveBlock(embed_dim, num_heads, num_steps, mlp_ratio, qkv_bias, eps,
                                             kv, backend)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def active_counts(self, tokens: int) -> list[int]:
        """Expert choice: tokens per image ([CLS] included) that run step l, for l = 1..L."""
        counts = [tokens]
        for _ in range(self.num_steps - 1):
            counts.append(1 + kept_count(counts[-1] - 1, self.beta))
        return counts

    def forward(self, images: torch.Tensor, depths: Optional[torch.Tensor] = None,
                return_aux: bool = False, kv: Optional[str] = None, backend: Optional[str] = None):
        """Logits (B, classes), or a :class:`MoRViTOutput` with ``return_aux=True``.

        ``depths`` (B, N) in 1..L overrides the token-choice router's depths (token choice only;
        the gates still come from the router). ``kv`` and ``backend`` override the model's settings.
        """
        tokens = self.embed(images)
        kv = check_kv(self.recursion.kv if kv is None else kv)
        backend = rk.resolve_backend(self.recursion.backend if backend is None else backend)
        if self.routing == "token_choice":
            states, depths, logits, scored = self._token_choice(tokens, depths, kv, backend)
        else:
            if depths is not None:
                raise ValueError("depths: expert-choice routing picks the depths itself; an override "
                                 "is only accepted with routing='token_choice'")
            run = self._expert_masked if backend == "eager" else self._expert_packed
            dtype = kernel_autocast_dtype(tokens, backend)
            if dtype is None:
                states, depths, logits, scored = run(tokens, kv, backend)
            else:  # as RecursiveBlock does: the steps in autocast's dtype, autocast off
                with torch.autocast(tokens.device.type, enabled=False):
                    states, depths, logits, scored = run(tokens.to(dtype), kv, backend)
                states = states.to(tokens.dtype)
        features = self.norm(states)
        class_logits = self.head(features[:, 0])
        if not return_aux:
            return class_logits
        probs = torch.sigmoid(logits)
        confidence = probs.gather(-1, depths[..., None] - 1)[..., 0]
        return MoRViTOutput(class_logits, depths, confidence, logits, probs, features, scored,
                            self.routing)

    def _router_logits(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Step ``step``'s router logits ``z = w . x + b``: (..., C) -> (...)."""
        router = self.router
        weight, bias = router.weight[step - 1:step], router.bias[step - 1:step]
        return F.linear(x, weight.to(x.dtype), bias.to(x.dtype))[..., 0]

    def _token_choice(self, tokens, depths, kv, backend):
        logits = self.router(tokens)  # (B, N, L)
        if depths is None:
            depths = logits.argmax(-1) + 1
            depths[:, 0] = self.num_steps  # [CLS] always runs every step
        else:
            self._check_depth_override(depths, tokens)
            depths = depths.to(torch.int64)
        gates = torch.sigmoid(logits.gather(-1, depths[..., None] - 1)[..., 0])
        states = self.recursion(tokens, depths, kv=kv, backend=backend, gates=gates)
        return states, depths, logits, torch.ones_like(logits, dtype=torch.bool)

    def _expert_masked(self, tokens, kv, backend):
        """Reference: every step computes every token; the selection gates the updates."""
        batch, count, _ = tokens.shape
        x, active = tokens, torch.ones(batch, count, dtype=torch.bool, device=tokens.device)
        step_logits, step_scored, depths = [], [], torch.zeros_like(active, dtype=torch.int64)
        for step, running in enumerate(self.active_counts(count), start=1):
            logits = self._router_logits(x, step)  # (B, N)
            scored = active
            if step > 1:
                active = _select(logits, active, running - 1)
            layer = _GatedLayer(self.recursion.layer_for_step(step), torch.sigmoid(logits))
            x = torch.where(active[..., None], layer(x, active if kv == "active" else None), x)
            depths = depths + active.long()
            step_logits.append(logits.masked_fill(~scored, -math.inf))
            step_scored.append(scored)
        return x, depths, torch.stack(step_logits, -1), torch.stack(step_scored, -1)

    def _expert_packed(self, tokens, kv, backend):
        """Active prefix of a (B*N, C) row buffer, re-sorted at every step (module docstring)."""
        batch, count, dim = tokens.shape
        device = tokens.device
        counts = self.active_counts(count)
        rows = tokens.reshape(batch * count, dim)
        token_of_row = torch.arange(count, device=device).repeat(batch)  # token index of each row
        step_logits, step_scored = [], []
        for step, active in enumerate(counts, start=1):
            previous = counts[step - 2] if step > 1 else count
            prefix_tokens = token_of_row[: batch * previous].view(batch, previous)
            logits = self._router_logits(rows[: batch * previous], step).view(batch, previous)
            step_logits.append(torch.full((batch, count), -math.inf, device=device, dtype=logits.dtype)
                               .scatter(1, prefix_tokens, logits))
            # from the selection, not the values: a NaN logit is still scored (the losses count it)
            step_scored.append(torch.zeros(batch, count, dtype=torch.bool, device=device)
                               .scatter(1, prefix_tokens, True))
            if step > 1:  # re-sort the prefix: kept rows first, both parts in token order
                keep = _select(logits, torch.ones_like(prefix_tokens, dtype=torch.bool), active - 1)
                order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
                token_of_row = torch.cat([_kept_then_left(prefix_tokens.gather(1, order), active),
                                          token_of_row[batch * previous:]])
                prefix = rows[: batch * previous].view(batch, previous, dim)
                prefix = prefix.gather(1, order[..., None].expand(-1, -1, dim))
                rows = _write_prefix(rows, _kept_then_left(prefix, active))
            layout = _step_layout(batch, count, counts[:step], token_of_row)
            num_rows = batch * active
            layer = _GatedLayer(self.recursion.layer_for_step(step), torch.sigmoid(step_logits[-1]))
            rows = _write_prefix(rows, layer.forward_packed(rows, layout, 1, num_rows, kv, backend))
        states = rk.unpack(rows, layout)
        depth_of_row = torch.cat([torch.full((batch * size,), depth, device=device)
                                  for depth, size in zip(range(len(counts), 0, -1), _group_sizes(counts))])
        depths = depth_of_row.index_select(0, layout.inverse_perm).view(batch, count)
        return states, depths, torch.stack(step_logits, -1), torch.stack(step_scored, -1)


class GatedRecursiveBlock(RecursiveBlock):
    """:class:`recvit.RecursiveBlock` whose updates are gated per token: ``h <- h + g * (layer(h) - h)``.

    ``forward(x, depths, gates=g)`` takes ``g`` (B, N); its eager and packed loops are
    RecursiveBlock's, run over gated views of the head/shared/tail layers. Without ``gates`` it is
    RecursiveBlock, and ``layer_for_step`` returns the plain layers.
    """

    _gates: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, depths: torch.Tensor, kv: Optional[str] = None,
                backend: Optional[str] = None, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        if gates is not None and gates.shape != x.shape[:2]:
            raise ValueError(f"gates: expected shape {tuple(x.shape[:2])}, got {tuple(gates.shape)}")
        self._gates = gates
        try:
            return super().forward(x, depths, kv, backend)
        finally:
            self._gates = None

    def layer_for_step(self, step: int):
        layer = super().layer_for_step(step)
        return layer if self._gates is None else _GatedLayer(layer, self._gates)

    def _records_grad(self, rows: torch.Tensor) -> bool:
        """The gates come from outside (the routers): autograd records if they need a gradient too."""
        gated = self._gates is not None and self._gates.requires_grad and torch.is_grad_enabled()
        return gated or super()._records_grad(rows)


class _GatedLayer:
    """A layer whose update of each token is scaled by the token's gate (B, N)."""

    def __init__(self, layer: nn.Module, gates: torch.Tensor):
        self.layer, self.gates = layer, gates

    def __call__(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x + self.gates[..., None] * (self.layer(x, key_mask) - x)

    def forward_packed(self, rows, layout, step, num_rows, kv="active", backend=None, max_active=None,
                       out=None):
        updated = self.layer.forward_packed(rows, layout, step, num_rows, kv, backend, max_active)
        gated = self._gated(rows[:num_rows], updated, layout)
        return gated if out is None else out.copy_(gated)

    def forward_static(self, rows, layout, step, kv="active", backend=None, out=None):
        """Rows past M_l of the result are unspecified; with ``out`` the live ones are merged in."""
        gated = self._gated(rows, self.layer.forward_static(rows, layout, step, kv, backend), layout)
        if out is None:
            return gated
        live = torch.arange(rows.shape[0], device=rows.device)[:, None] < layout.step_rows[step - 1]
        return out.copy_(torch.where(live, gated, out))

    def _gated(self, prefix, updated, layout):
        gates = self.gates.reshape(-1).index_select(0, layout.perm[:prefix.shape[0]])[:, None]
        return prefix + gates * (updated - prefix)


def _select(logits: torch.Tensor, candidates: torch.Tensor, kept: int) -> torch.Tensor:
    """(B, T) bool: column 0 ([CLS]) plus, per row, the ``kept`` candidate columns 1.. of highest
    logit (ties: lower column first). ``candidates`` (B, T) bool marks who may be kept."""
    scores = logits[:, 1:].masked_fill(~candidates[:, 1:], -math.inf)
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :kept]
    keep = torch.zeros_like(candidates).scatter(1, ranked + 1, True)
    keep[:, 0] = True
    return keep


def _kept_then_left(prefix: torch.Tensor, active: int) -> torch.Tensor:
    """(B, T, ...) re-sorted prefix -> (B*T, ...) rows: every image's first ``active`` slots, image-major,
    then every image's remaining slots, image-major."""
    tail = prefix.shape[2:]
    return torch.cat([prefix[:, :active].reshape(-1, *tail), prefix[:, active:].reshape(-1, *tail)])


def _group_sizes(counts: list[int]) -> list[int]:
    """Rows per image of each row group after step ``len(counts)``, depth descending: the active
    prefix, then the tokens that left at steps ``len(counts)``, ..., 2."""
    return [counts[-1]] + [counts[s - 1] - counts[s] for s in range(len(counts) - 1, 0, -1)]


def _step_layout(batch: int, tokens: int, counts: list[int], token_of_row: torch.Tensor) -> rk.DepthLayout:
    """The one-step :class:`recvit_kernels.DepthLayout` of the current rows (valid for step 1 of it).

    Rows: the active prefix, ``counts[-1]`` rows per image, image-major; behind it the tokens that
    left at steps ``len(counts)``, ..., 2, each such group image-major with ``counts[s-2] - counts[s-1]``
    rows per image. ``token_of_row`` (B*N,) holds the token index of each row.
    """
    device = token_of_row.device
    image = torch.arange(batch, device=device)[:, None]
    pieces, start = [], 0
    for size in _group_sizes(counts):
        pieces.append(start + image * size + torch.arange(size, device=device))
        start += batch * size
    image_order = torch.cat(pieces, 1).reshape(-1)
    image_of_row = torch.empty_like(image_order)
    image_of_row[image_order] = image.expand(-1, tokens).reshape(-1)
    perm = image_of_row * tokens + token_of_row
    inverse_perm = torch.empty_like(perm)
    inverse_perm[perm] = torch.arange(perm.numel(), device=device)
    lengths = torch.full((1, batch), counts[-1], dtype=torch.int32, device=device)
    cu_seqlens = F.pad(lengths.cumsum(1, dtype=torch.int32), (1, 0))
    return rk.DepthLayout(batch, tokens, 1, perm, inverse_perm, lengths.sum(1).long(), lengths,
                          cu_seqlens, image_order)


@register_model
def mor_vit_tiny(**overrides) -> MoRViT:
    return MoRViT(**{"embed_dim": 192, "num_heads": 3, **overrides})


@register_model
def mor_vit_small(**overrides) -> MoRViT:
    return MoRViT(**{"embed_dim": 384, "num_heads": 6, **overrides})


@register_model
def mor_vit_base(**overrides) -> MoRViT:
    """MoR-B/16 (paper Table 1): 768 dims, 12 heads, MLP 3072, L = 12, beta = 0.35."""
    return MoRViT(**{"embed_dim": 768, "num_heads": 12, **overrides})
