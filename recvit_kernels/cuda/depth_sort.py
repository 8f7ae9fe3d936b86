"""Depth sort on the GPU: the extension's two-launch counting sort, returning a ``DepthLayout``.

Same contract as :func:`recvit_kernels.depth_sort`: (B, N) integer depths in 1..L. No host sync.
The kernels clamp depths outside 1..L instead of reading out of bounds; with
``RECVIT_CHECK_VALUES=1`` the range is checked first (a host sync) and violations raise
``ValueError`` naming ``depths``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import register
from .._checks import values_checkable
from ..depth_sort import DepthLayout, check_depths
from . import device_reason, extension


def _supports(depths: torch.Tensor, num_steps: int) -> Optional[str]:
    reason = device_reason("depths", depths)
    if reason is not None:
        return reason
    limit = extension().max_depth_steps
    if num_steps > limit:
        return f"num_steps={num_steps} exceeds the cuda depth sort's limit of {limit}"
    return None


@register("depth_sort", "cuda", supports=_supports)
def depth_sort_cuda(depths: torch.Tensor, num_steps: int) -> DepthLayout:
    if values_checkable(depths):
        check_depths(depths, num_steps)
    if depths.dtype not in (torch.int32, torch.int64) and not depths.dtype.is_floating_point:
        depths = depths.to(torch.int64)  # uint8/int16 maps; floats reach the binding's error
    batch, tokens = depths.shape
    perm, inverse_perm, step_rows, image_lengths, cu_seqlens, image_order = \
        extension().depth_sort(depths, num_steps)
    return DepthLayout(batch, tokens, num_steps, perm, inverse_perm, step_rows, image_lengths,
                       cu_seqlens, image_order)
