"""Depth sort on the GPU: the extension's two-launch counting sort, returning a ``DepthLayout``.

Same contract as :func:`recvit_kernels.depth_sort`: (B, N) integer depths in 1..L. No host sync.
The kernels clamp depths outside 1..L instead of reading out of bounds; with
``RECVIT_CHECK_VALUES=1`` the front end checks the range first (a host sync) and violations raise
``ValueError`` naming ``depths``. The kernels run as the custom op ``torch.ops.recvit.depth_sort_cuda``
(opaque to ``torch.compile`` and ``torch.export``, with a fake implementation).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import call_op, constant_while_tracing, register
from ..depth_sort import DepthLayout
from . import device_reason, extension


def _supports(depths: torch.Tensor, num_steps: int) -> Optional[str]:
    reason = device_reason("depths", depths)
    if reason is not None:
        return reason
    limit = _max_depth_steps()
    if num_steps > limit:
        return f"num_steps={num_steps} exceeds the cuda depth sort's limit of {limit}"
    return None


# A fact of the build: torch.compile asks the extension at trace time and keeps the answer.
@constant_while_tracing
def _max_depth_steps() -> int:
    return extension().max_depth_steps


@torch.library.custom_op("recvit::depth_sort_cuda", mutates_args=())
def _depth_sort_op(depths: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
    """perm, inverse_perm, step_rows, image_lengths, cu_seqlens, image_order (see DepthLayout)."""
    return list(extension().depth_sort(depths, num_steps))


@_depth_sort_op.register_fake
def _(depths, num_steps):
    batch, tokens = depths.shape
    rows = depths.new_empty(batch * tokens, dtype=torch.int64)
    return [rows, torch.empty_like(rows), depths.new_empty(num_steps, dtype=torch.int64),
            depths.new_empty((num_steps, batch), dtype=torch.int32),
            depths.new_empty((num_steps, batch + 1), dtype=torch.int32), torch.empty_like(rows)]


@register("depth_sort", "cuda", supports=_supports)
def depth_sort_cuda(depths: torch.Tensor, num_steps: int) -> DepthLayout:
    if depths.dtype not in (torch.int32, torch.int64):
        depths = depths.to(torch.int64)  # uint8/int16 maps (the front end refuses the other dtypes)
    batch, tokens = depths.shape
    perm, inverse_perm, step_rows, image_lengths, cu_seqlens, image_order = \
        call_op(_depth_sort_op, depths, num_steps)
    return DepthLayout(batch, tokens, num_steps, perm, inverse_perm, step_rows, image_lengths,
                       cu_seqlens, image_order)
