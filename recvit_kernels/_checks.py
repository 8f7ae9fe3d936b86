"""Argument checks shared by the ops: each error names the offending argument."""
from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import is_fake


def tracing(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s values are unknown here: ``torch.compile`` or ``torch.export`` is tracing,
    or ``tensor`` is a fake or meta tensor (shape propagation). Reading values back to the host
    then breaks the graph (or fails), so value checks are skipped and the sync-free paths taken."""
    return torch.compiler.is_compiling() or tensor.is_meta or is_fake(tensor)


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether value checks (which read device memory back to the host) may run on ``tensor``.

    On the CPU unless ``RECVIT_CHECK_VALUES=0``; on a GPU only with ``RECVIT_CHECK_VALUES=1``,
    because reading values back stalls the device and breaks CUDA-graph capture. Never while
    tracing (:func:`tracing`): the shape, dtype and device checks still run there.
    """
    if tracing(tensor):
        return False
    setting = os.environ.get("RECVIT_CHECK_VALUES")
    return setting == "1" or (tensor.device.type == "cpu" and setting != "0")


def check_tensor(name: str, tensor, dim: int, dtype=None, device=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(tensor.shape)}")
    if dtype is not None and tensor.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise ValueError(f"{name}: expected dtype {dtype}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name}: expected device {device}, got {tensor.device}")


def check_floating(name: str, tensor: torch.Tensor) -> None:
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating dtype, got {tensor.dtype}")


def check_cu_seqlens(name: str, cu_seqlens, device, total: int) -> None:
    """``cu_seqlens`` must be int32 (B+1,), start at 0, never decrease and end at most at ``total``."""
    check_tensor(name, cu_seqlens, 1, torch.int32, device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name}: expected at least 2 entries (batch + 1), got {cu_seqlens.numel()}")
    if values_checkable(cu_seqlens):
        values = cu_seqlens.tolist()
        if values[0] != 0:
            raise ValueError(f"{name}: must start at 0, got {values[0]}")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name}: must be non-decreasing, got {values}")
        if values[-1] > total:
            raise ValueError(f"{name}: last entry {values[-1]} exceeds the {total} rows given")


def check_out_apart(out: torch.Tensor, reads: dict, may_be: str) -> None:
    """Refuse an ``out`` (2-D, unit column stride) that overlaps itself or a tensor the op reads.

    ``reads`` maps each argument's name to its tensor (or None). The kernels' programs write ``out``
    while others still read their inputs: an overlap races on a GPU (the interpreter runs programs
    in order and may hide it). ``out`` may be ``reads[may_be]`` itself (same address, dtype, shape
    and strides; the residual): each element is then read by the program that overwrites it. Two
    tensors overlap when the address ranges they span meet, whatever their storages (two views
    interleaved in one buffer count as overlapping; two storages may share memory: tensors from
    overlapping slices of one NumPy array or DLPack buffer). Metadata only: no sync, no launch;
    skipped while tracing (no addresses).
    """
    if not out.numel() or tracing(out):
        return
    if out.shape[0] > 1 and out.stride(0) < out.shape[1]:
        raise ValueError(f"out: its rows overlap one another (shape {tuple(out.shape)}, strides "
                         f"{out.stride()}); pass a buffer with distinct rows")
    span = _address_range(out)
    for name, tensor in reads.items():
        if tensor is None or not tensor.numel():
            continue
        if (name == may_be and tensor.data_ptr() == out.data_ptr() and tensor.dtype == out.dtype
                and tensor.shape == out.shape and tensor.stride() == out.stride()):
            continue
        other = _address_range(tensor)
        if span[0] < other[1] and other[0] < span[1]:
            raise ValueError(f"out: overlaps {name}, which the op reads while writing out; pass a "
                             f"separate buffer (out may be {may_be} itself, not part of it)")


def _address_range(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, past the last) byte address of a non-empty tensor's elements."""
    extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + (extent + 1) * tensor.element_size()
