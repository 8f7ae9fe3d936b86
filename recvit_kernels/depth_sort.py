"""Depth sort: the packed "depth-major" layout in which every recursion step is a row prefix.

Given per-token depths ``d`` of shape (B, N) with values in 1..L, sort the B*N tokens once by depth,
descending (ties in image-major token order). At step ``l`` the active tokens (``d >= l``) are then
the first ``M_l`` rows of the sorted buffer, so the token-wise layers run on a contiguous prefix.
Attention reads each image's active rows through one index table per forward, ``image_order``:
image b's rows at step l are ``image_order[b*N : b*N + n_bl]``, i.e. static segment starts b*N
(``all_rows_cu_seqlens``) with used lengths ``image_lengths[l]`` (flash-attention 3's ``seqused``).
``attention_rows`` gives one step's rows as a compact table, flash-attention's plain varlen form.

Everything here is computed on the device without a host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ._backend import dispatch, register
from ._checks import check_tensor, tracing, values_checkable


@dataclass
class DepthLayout:
    """The sorted layout of a (B, N) depth map; all tensors live on the depths' device.

    Attributes:
        batch, tokens, num_steps: B, N and L.
        perm: (B*N,) int64, flat token index (b*N + i) of each sorted row.
        inverse_perm: (B*N,) int64, sorted row of each flat token.
        step_rows: (L,) int64, M_l = number of active rows at step l (index 0 is step 1).
        image_lengths: (L, B) int32, active tokens of image b at step l.
        cu_seqlens: (L, B+1) int32, cumulative ``image_lengths`` per step (flash-attention form).
        image_order: (B*N,) int64, sorted rows listed image by image, each image's rows by depth
            descending: image b's active rows at step l are ``image_order[b*N : b*N + n_bl]``.
    """

    batch: int
    tokens: int
    num_steps: int
    perm: torch.Tensor
    inverse_perm: torch.Tensor
    step_rows: torch.Tensor
    image_lengths: torch.Tensor
    cu_seqlens: torch.Tensor
    image_order: torch.Tensor
    _starts: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self._starts = torch.arange(0, (self.batch + 1) * self.tokens, self.tokens,
                                    device=self.perm.device, dtype=torch.int32)

    def attention_rows(self, step: int, total: int) -> torch.Tensor:
        """(total,) int64: the sorted rows active at ``step`` (1-based), image-major.

        ``total`` is M_step when known on the host; a larger static bound (e.g. B*N) keeps the call
        free of host syncs, and the entries past M_step then repeat the last image's rows (callers
        mask them with ``cu_seqlens``).
        """
        cu = self.cu_seqlens[step - 1]
        positions = torch.arange(total, device=cu.device)
        image = torch.searchsorted(cu[1:].to(torch.int64), positions, right=True)
        image = image.clamp_max(self.batch - 1)
        offset = (positions - cu[image]).clamp(0, self.tokens - 1)
        return self.image_order[image * self.tokens + offset]

    def all_rows_cu_seqlens(self) -> torch.Tensor:
        """(B+1,) int32 segment bounds b*N of ``image_order`` (every token of each image), built with
        the layout: once per forward for all its steps."""
        return self._starts


def check_depths(depths: torch.Tensor, num_steps: int, name: str = "depths", values: bool = True) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``depths`` is a (B, N) integer tensor in 1..L.

    The range check reads the values back to the host: call it outside captured regions. It is
    skipped without ``values``, and while ``torch.compile`` / ``torch.export`` trace (or on fake or
    meta tensors); the shape and dtype checks are kept.
    """
    if not isinstance(depths, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(depths).__name__}")
    if depths.dim() != 2:
        raise ValueError(f"{name}: expected shape (batch, tokens), got {tuple(depths.shape)}")
    if depths.dtype.is_floating_point or depths.dtype == torch.bool or depths.is_complex():
        raise ValueError(f"{name}: expected an integer dtype, got {depths.dtype}")
    if not values or not depths.numel() or tracing(depths):
        return
    if int(depths.min()) < 1 or int(depths.max()) > num_steps:
        raise ValueError(f"{name}: values must lie in 1..{num_steps}, got "
                         f"{int(depths.min())}..{int(depths.max())}")


def _depth_sort_eager(depths: torch.Tensor, num_steps: int) -> DepthLayout:
    """About a dozen small launches, once per forward: two stable sorts and a histogram."""
    batch, tokens = depths.shape
    flat = depths.reshape(-1).to(torch.int64)
    # Depth descending, ties in flat (image-major) order; a counting sort in the CUDA backend.
    perm = torch.sort(flat, descending=True, stable=True).indices
    inverse_perm = torch.empty_like(perm)
    inverse_perm[perm] = torch.arange(flat.numel(), device=depths.device)
    # Each image's rows in sorted (depth-descending) order: a stable sort of the rows by image.
    image_order = torch.sort(perm // tokens, stable=True).indices

    # histogram[d, b] = tokens of image b with depth d; image_lengths[l-1, b] = those with depth >= l
    histogram = torch.zeros(num_steps + 1, batch, dtype=torch.int32, device=depths.device)
    histogram.scatter_add_(0, flat.view(batch, tokens).t(), torch.ones_like(histogram[:1]).expand(tokens, batch))
    image_lengths = tokens - histogram[:-1].cumsum(0, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(image_lengths.cumsum(1, dtype=torch.int32), (1, 0))
    return DepthLayout(batch, tokens, num_steps, perm, inverse_perm, image_lengths.sum(1), image_lengths,
                       cu_seqlens, image_order)


register("depth_sort", "eager")(_depth_sort_eager)
register("depth_sort", "packed")(_depth_sort_eager)


def depth_sort(depths: torch.Tensor, num_steps: int, backend: Optional[str] = None) -> DepthLayout:
    """Sort the tokens of a (B, N) depth map (values in 1..``num_steps``) into the prefix layout.

    The values are checked where that reads no GPU memory back (:func:`values_checkable`)."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
    check_depths(depths, num_steps, values=values_checkable(depths))
    if 0 in depths.shape:
        raise ValueError(f"depths: expected a non-empty shape (batch, tokens), got {tuple(depths.shape)}")
    return dispatch("depth_sort", backend, depths, num_steps)(depths, num_steps)


def pack(x: torch.Tensor, layout: DepthLayout) -> torch.Tensor:
    """(B, N, C) tokens -> (B*N, C) rows in sorted order."""
    _check_rows("x", x, 3, (layout.batch, layout.tokens), layout)
    return x.reshape(layout.batch * layout.tokens, -1).index_select(0, layout.perm)


def unpack(rows: torch.Tensor, layout: DepthLayout) -> torch.Tensor:
    """(B*N, C) sorted rows -> (B, N, C) tokens in their original order."""
    _check_rows("rows", rows, 2, (layout.batch * layout.tokens,), layout)
    return rows.index_select(0, layout.inverse_perm).reshape(layout.batch, layout.tokens, -1)


def _check_rows(name, tensor, dim, leading, layout):
    check_tensor(name, tensor, dim, device=layout.perm.device)
    if tensor.shape[:len(leading)] != leading:
        raise ValueError(f"{name}: expected shape ({', '.join(map(str, leading))}, C) for this layout, "
                         f"got {tuple(tensor.shape)}")
