"""Per-token depth over L steps: each token runs steps 1..d, step l with its own layer.

At step l (1-based) the active tokens are those with depth >= l; they are updated by the step's
layer while the others keep their state. With ``kv="active"`` attention runs over the active tokens
only; with ``kv="all"`` active queries attend to every token, exited ones with their frozen states.

:class:`DepthSteps` is the machinery, for any ``layer_for_step(l)``. Two structures use it:
:class:`RecursiveBlock` (Edge-RecViT, MoR-ViT), a head layer, ONE shared layer reused at steps
2..L-1 and a tail layer; :class:`DepthAdaptiveBlocks`, L distinct layers (an early-exit ViT: a
token of depth d runs the first d blocks).

Backends: ``eager`` is the masked reference (every token computed at every step, updates gated);
``packed``, ``triton``, ``cuda`` and ``auto`` sort the tokens by depth once and run each step on
the active row prefix with that backend's ops.
"""
from __future__ import annotations

import copy
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

import recvit_kernels as rk
from recvit_kernels._checks import tracing, values_checkable

from .layers import Block, check_kv, check_positive_int


class DepthSteps(nn.Module):
    """Per-token depth over ``num_steps`` steps: (B, N, C) token states and (B, N) depths in 1..L ->
    new states, step l run by ``layer_for_step(l)`` (a :class:`~recvit.models.layers.Block`) on the tokens
    with depth >= l. Subclasses say which layer runs each step.

    ``static_shapes = True`` makes the packed path free of host syncs (for CUDA-graph capture):
    every step launches over a static bound of B*N rows with M_l kept on the device. On ``triton``
    every kernel reads M_l (or the per-image lengths) there and touches the live rows only; in
    inference the last GEMM writes the live prefix into the row buffer in place. Attention skips
    the inactive rows on every backend; the token-wise layers cost as much as the dense model on
    ``packed``.

    ``torch.compile`` and ``torch.export`` (and fake or meta tensors) always take that sync-free
    path: the packed path's host read of the per-step row counts cannot be traced. They skip the
    depth range check too (it reads the depths back); eager calls are unchanged.
    """

    static_shapes = False

    def __init__(self, dim: int, num_steps: int, kv: str = "active", backend: Optional[str] = None):
        super().__init__()
        self.dim, self.num_steps, self.kv = dim, num_steps, check_kv(kv)
        self.backend = None if backend is None else rk.resolve_backend(backend)

    def layer_for_step(self, step: int) -> Block:
        """The layer that runs step ``step`` (1..L)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, depths: torch.Tensor, kv: Optional[str] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        dim = self.dim
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"x: expected shape (batch, tokens, {dim}) for this block's dim={dim}, got "
                             f"{tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x: expected at least one image and one token, got shape {tuple(x.shape)}")
        if depths.shape != x.shape[:2]:
            raise ValueError(f"depths: expected shape {tuple(x.shape[:2])}, got {tuple(depths.shape)}")
        if values_checkable(depths):
            rk.check_depths(depths, self.num_steps)
        kv = check_kv(self.kv if kv is None else kv)
        backend = rk.resolve_backend(self.backend if backend is None else backend)
        if backend == "eager":
            return self._forward_masked(x, depths, kv)
        dtype = kernel_autocast_dtype(x, backend)
        if dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self._forward_packed(x.to(dtype), depths, kv, backend).to(x.dtype)
        return self._forward_packed(x, depths, kv, backend)

    def _forward_masked(self, x, depths, kv):
        for step in range(1, self.num_steps + 1):
            active = depths >= step
            key_mask = None
            if kv == "active":  # an image with no active token keeps all keys to stay finite
                key_mask = active | ~active.any(1, keepdim=True)
            updated = self.layer_for_step(step)(x, key_mask)
            x = torch.where(active[..., None], updated, x)
        return x

    def _forward_packed(self, x, depths, kv, backend):
        layout = rk.depth_sort(depths, self.num_steps, backend=backend)
        rows = rk.pack(x, layout)
        if self.static_shapes or tracing(rows):
            return rk.unpack(self._steps_static(rows, layout, kv, backend), layout)
        # The one host sync of this path: the per-step row counts size the prefix GEMMs, the
        # longest image per step bounds the attention tiles.
        step_rows, longest = torch.stack([layout.step_rows, layout.image_lengths.amax(1).long()]).tolist()
        if self._records_grad(rows):
            return rk.unpack(self._steps_recorded(rows, layout, step_rows, longest, kv, backend), layout)
        for step, (num_rows, max_active) in enumerate(zip(step_rows, longest), start=1):
            if num_rows == 0:
                break
            # the MLP's last epilogue writes the new prefix in place
            self.layer_for_step(step).forward_packed(rows, layout, step, num_rows, kv, backend,
                                                     max_active, out=rows[:num_rows])
        return rk.unpack(rows, layout)

    def _steps_recorded(self, rows, layout, step_rows, longest, kv, backend):
        """The packed steps under autograd, out of place; returns the final (B*N, C) rows.

        With ``kv="active"`` step l reads only the previous step's M_(l-1) rows, and the rows that
        leave at l (``rows[M_l:]``, already final) are set aside and joined once at the end: what
        autograd keeps for the backward is the live rows of each step, sum_l M_l rows, not L full
        buffers. With ``kv="all"`` every step reads all rows (the exited tokens' keys), so the
        buffer is rebuilt each step.
        """
        finished = []  # the rows that left at each step, deepest first
        for step, (num_rows, max_active) in enumerate(zip(step_rows, longest), start=1):
            if num_rows == 0:
                break
            updated = self.layer_for_step(step).forward_packed(rows, layout, step, num_rows, kv,
                                                               backend, max_active)
            if kv == "all":
                rows = torch.cat([updated, rows[num_rows:]])
            else:
                finished.append(rows[num_rows:])
                rows = updated
        return torch.cat([rows, *reversed(finished)]) if finished else rows

    def _records_grad(self, rows: torch.Tensor) -> bool:
        """Whether autograd records the steps (then they run out of place, keeping the old rows)."""
        return torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad
                                                                      for p in self.parameters()))

    def _steps_static(self, rows, layout, kv, backend):
        """All L steps on the static rows, M_l read on the device (no host sync).

        Inference: each step's fc2 epilogue writes the live prefix into ``rows`` in place (``rows``
        is the fresh buffer ``pack`` made), so the exited rows are never touched. Under autograd
        the step is out of place and merged with a ``torch.where`` over all rows (training only).
        """
        records = self._records_grad(rows)
        position = torch.arange(rows.shape[0], device=rows.device)[:, None] if records else None
        for step in range(1, self.num_steps + 1):
            layer = self.layer_for_step(step)
            if records:
                updated = layer.forward_static(rows, layout, step, kv, backend)
                rows = torch.where(position < layout.step_rows[step - 1], updated, rows)
            else:
                layer.forward_static(rows, layout, step, kv, backend, out=rows)
        return rows


class RecursiveBlock(DepthSteps):
    """Drop-in fast recursive block: the head layer at step 1, the shared layer at steps 2..L-1, the
    tail layer at step L (:class:`DepthSteps` for the forward, its backends and paths)."""

    def __init__(self, dim: int, num_heads: int, num_steps: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, eps: float = 1e-6, kv: str = "active",
                 backend: Optional[str] = None, mlp_hidden_dim: Optional[int] = None,
                 mlp_activation: str = "gelu"):
        num_steps = check_positive_int("num_steps", num_steps, minimum=2)  # a head and a tail step
        super().__init__(dim, num_steps, kv, backend)
        layer = (dim, num_heads, mlp_ratio, qkv_bias, eps, mlp_hidden_dim, mlp_activation)
        self.head_layer, self.shared_layer, self.tail_layer = Block(*layer), Block(*layer), Block(*layer)

    @classmethod
    def from_blocks(cls, head: nn.Module, shared: nn.Module, tail: nn.Module, num_steps: int = 12,
                    **kwargs) -> "RecursiveBlock":
        """Build from three timm-style ``Block`` modules (weights copied, the originals untouched); the
        MLP keeps the source's width and activation as they are."""
        qkv = head.attn.qkv
        dim, num_heads, hidden = qkv.in_features, head.attn.num_heads, head.mlp.fc1.out_features
        block = cls(dim, num_heads, num_steps, hidden / dim, qkv.bias is not None, head.norm1.eps,
                    mlp_hidden_dim=hidden, mlp_activation=getattr(head.mlp, "activation", "gelu"), **kwargs)
        for name, source in (("head_layer", head), ("shared_layer", shared), ("tail_layer", tail)):
            _copy_weights(source, getattr(block, name), name)
        return block

    def layer_for_step(self, step: int) -> Block:
        if step == 1:
            return self.head_layer
        return self.tail_layer if step == self.num_steps else self.shared_layer


class DepthAdaptiveBlocks(DepthSteps):
    """L distinct layers with per-token depth (an early-exit ViT): a token of depth d runs blocks
    1..d, step l is ``self[l - 1]`` (:class:`DepthSteps` for the forward, its backends and paths).

    ``blocks``: L >= 1 timm-style blocks of one width. A :class:`recvit.models.layers.Block` is used as it
    is (its parameters shared); any other (timm's ``Block``) becomes one with its weights copied,
    the original untouched (ValueError if it has parameters a Block lacks: layer scale, qk-norm).
    The blocks are this module's children ``0``..``L-1``: under a model attribute ``blocks`` the
    state-dict keys are timm's ``blocks.{i}.*``.
    """

    def __init__(self, blocks: Sequence[nn.Module], kv: str = "active", backend: Optional[str] = None):
        if not hasattr(blocks, "__iter__") or (isinstance(blocks, nn.Module)
                                               and not isinstance(blocks, (nn.ModuleList, nn.Sequential))):
            raise TypeError(f"blocks: expected a sequence of blocks, got {type(blocks).__name__}")
        layers = [_as_block(block, f"blocks[{index}]") for index, block in enumerate(blocks)]
        if not layers:
            raise ValueError("blocks: expected at least one block, got none")
        widths = sorted({layer.norm1.normalized_shape[0] for layer in layers})
        if len(widths) != 1:
            raise ValueError(f"blocks: expected blocks of one width (one row buffer), got widths {widths}")
        super().__init__(widths[0], len(layers), kv, backend)
        for index, layer in enumerate(layers):
            self.add_module(str(index), layer)

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[Block]:
        return iter(self._modules.values())

    def __getitem__(self, index: int) -> Block:
        return list(self._modules.values())[index]

    def layer_for_step(self, step: int) -> Block:
        return self._modules[str(step - 1)]


def _as_block(source: nn.Module, name: str) -> Block:
    """``source`` if it is a :class:`Block`, else a Block of its shape holding a copy of its weights."""
    if isinstance(source, Block):
        return source
    attn, mlp, norm1 = (getattr(source, part, None) for part in ("attn", "mlp", "norm1"))
    if not isinstance(source, nn.Module) or not all(
            hasattr(part, attr) for part, attr in ((attn, "qkv"), (attn, "num_heads"), (mlp, "fc1"), (norm1, "eps"))):
        raise TypeError(f"{name}: expected a timm-style block (norm1, attn.qkv, attn.num_heads, attn.proj, "
                        f"norm2, mlp.fc1, mlp.fc2), got {type(source).__name__}")
    dim, hidden = attn.qkv.in_features, mlp.fc1.out_features
    block = Block(dim, attn.num_heads, hidden / dim, attn.qkv.bias is not None, norm1.eps,
                  mlp_hidden_dim=hidden, mlp_activation=getattr(mlp, "activation", "gelu"))
    _copy_weights(source, block, name)
    return block.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)


def _copy_weights(source: nn.Module, target: Block, name: str) -> None:
    """Load a copy of a timm-style block's weights into ``target``; ValueError naming ``name`` if the
    source has parameters the target lacks."""
    state = dict(source.state_dict())
    extra = sorted(set(state) - set(target.state_dict()))
    if extra:
        raise ValueError(f"{name}: the source block has parameters this layer lacks "
                         f"(layer scale or qk-norm are not supported): {extra}")
    target.load_state_dict(copy.deepcopy(state))


def kernel_autocast_dtype(x: torch.Tensor, backend: str) -> Optional[torch.dtype]:
    """Autocast's dtype when ``backend`` runs kernels under autocast on x's device, else None.

    Autocast would hand the ops mixed dtypes (LayerNorm and the residual stream in fp32, the GEMMs
    in bf16), and a kernel takes one dtype per call. So the recursion then runs in autocast's dtype
    with autocast off: the rows cast once, each op's parameters cast to them (differentiably: the
    parameters keep their dtype; ``Block._forward_rows``), LayerNorm with its fp32 statistics inside
    the kernel, and the result cast back to x's dtype.
    """
    kernels = backend in ("triton", "cuda") or (backend == "auto" and x.device.type == "cuda")
    if kernels and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _write_prefix(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """``rows`` with its first ``len(prefix)`` rows replaced: in place unless autograd needs the old."""
    if torch.is_grad_enabled() and (rows.requires_grad or prefix.requires_grad):
        return torch.cat([prefix, rows[prefix.shape[0]:]])
    rows[: prefix.shape[0]] = prefix
    return rows
