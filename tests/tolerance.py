"""flash-attention's tolerance rule, shared by the kernel tests."""
import torch


def assert_flash_rule(ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor,
                      floor: float) -> None:
    """``ours``' error against the fp64 ``reference`` is at most twice that of ``theirs`` (plain
    PyTorch in the same precision) plus ``floor``."""
    error = (ours.double() - reference).abs().max().item()
    baseline = (theirs.double() - reference).abs().max().item()
    assert error <= 2 * baseline + floor, (error, baseline)
