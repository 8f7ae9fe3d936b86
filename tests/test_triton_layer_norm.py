"""Triton LayerNorm (+fused residual) vs the eager op; GPU tests marked gpu."""
import pytest
import torch

import recvit_kernels as rk
from tolerance import assert_flash_rule

pytest.importorskip("triton")
if rk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {rk.unavailable_reason('triton')}", allow_module_level=True)

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(shape, dtype, with_bias=True, with_residual=True):
    width = shape[-1]
    x = torch.randn(*shape[:-1], width + 5, dtype=dtype, device=DEVICE)[..., :width]  # strided rows
    weight = 1 + 0.1 * torch.randn(width, dtype=dtype, device=DEVICE)
    bias = 0.1 * torch.randn(width, dtype=dtype, device=DEVICE) if with_bias else None
    residual = torch.randn(shape, dtype=dtype, device=DEVICE) if with_residual else None
    return x, weight, bias, residual


def check(shape, dtype, with_bias=True, with_residual=True):
    x, weight, bias, residual = make(shape, dtype, with_bias, with_residual)
    ours = rk.layer_norm(x, weight, bias, 1e-6, residual, backend="triton")
    theirs = rk.layer_norm(x, weight, bias, 1e-6, residual, backend="eager")
    if residual is None:
        ours, theirs = (ours,), (theirs,)
    else:  # the summed stream is one rounding of x + residual: exact
        assert torch.equal(ours[1], theirs[1])
    summed = x.double() if residual is None else theirs[-1].double()
    reference = torch.nn.functional.layer_norm(summed, (shape[-1],), weight.double(),
                                               None if bias is None else bias.double(), 1e-6)
    assert ours[0].shape == x.shape and ours[0].dtype == dtype
    assert_flash_rule(ours[0], theirs[0], reference, FLOOR[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(37, 48), (1, 1, 32), (3, 17, 192)])
def test_matches_eager(shape, with_bias, with_residual, dtype):
    check(shape, dtype, with_bias, with_residual)


def test_gradients_equal_eager():
    grads = {}
    for backend in ("triton", "eager"):
        torch.manual_seed(1)
        leaves = [t.requires_grad_() for t in (torch.randn(9, 40), 1 + torch.randn(40) * 0.1,
                                                torch.randn(40), torch.randn(9, 40))]
        out, summed = rk.layer_norm(leaves[0], leaves[1], leaves[2], 1e-6, leaves[3], backend=backend)
        (out.pow(2).sum() + summed.sin().sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for ours, theirs in zip(grads["triton"], grads["eager"]):
        torch.testing.assert_close(ours, theirs)


def test_unsupported_dtype_errors_or_falls_back(caplog, monkeypatch):
    # auto sends CPU tensors to packed; take the GPU's fall-back chain through the interpreter
    monkeypatch.setattr(rk._backend, "_on_cpu", lambda args: False)
    x, weight, bias, _ = make((4, 16), torch.float64, with_residual=False)
    with pytest.raises(RuntimeError, match="float64"):
        rk.layer_norm(x, weight, bias, backend="triton")
    with caplog.at_level("INFO", logger="recvit_kernels"):
        out = rk.layer_norm(x, weight, bias, backend="auto")
    assert "falling back from triton" in caplog.text
    torch.testing.assert_close(out, rk.layer_norm(x, weight, bias, backend="eager"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(256 * 197, 768), (8 * 577, 384), (197, 192)])
def test_gpu_real_sizes(shape, dtype):
    check(shape, dtype)
