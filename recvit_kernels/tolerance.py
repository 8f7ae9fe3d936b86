"""flash-attention's tolerance rule, shared by the tests and ``recvit check``.

A kernel in a low precision passes when its error against a float64 reference is at most twice the
error of plain PyTorch computing the same thing in the same precision, plus a small ``floor``:
``max|ours - reference| <= 2 * max|theirs - reference| + floor``. A NaN anywhere fails.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class FlashRule(NamedTuple):
    """``error`` (ours vs the reference), ``baseline`` (plain PyTorch vs the reference) and the
    ``bound`` ``2 * baseline + floor`` that ``error`` must not exceed."""

    error: float
    baseline: float
    bound: float

    @property
    def passed(self) -> bool:
        return self.error <= self.bound  # False when either is NaN


def flash_rule(ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor,
               floor: float) -> FlashRule:
    """Measure ``ours`` and ``theirs`` (same shape) against ``reference`` (float64, same shape).

    Reads two numbers back to the host: call it outside captured regions.
    """
    if ours.shape != reference.shape or theirs.shape != reference.shape:
        raise ValueError(f"ours, theirs: expected the reference's shape {tuple(reference.shape)}, got "
                         f"{tuple(ours.shape)} and {tuple(theirs.shape)}")
    reference = reference.double()
    error = (ours.double() - reference).abs().max().item() if ours.numel() else 0.0
    baseline = (theirs.double() - reference).abs().max().item() if theirs.numel() else 0.0
    return FlashRule(error, baseline, 2 * baseline + floor)


def assert_flash_rule(ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor,
                      floor: float) -> None:
    """``ours``' error against the fp64 ``reference`` is at most twice that of ``theirs`` (plain
    PyTorch in the same precision) plus ``floor``."""
    rule = flash_rule(ours, theirs, reference, floor)
    assert rule.passed, (rule.error, rule.baseline)
