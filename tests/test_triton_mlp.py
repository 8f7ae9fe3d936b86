"""Triton-epilogue MLP vs the eager op; GPU tests marked gpu."""
import pytest
import torch

import recvit_kernels as rk
from tolerance import assert_flash_rule

pytest.importorskip("triton")
if rk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {rk.unavailable_reason('triton')}", allow_module_level=True)

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(rows, dim, hidden, dtype, with_bias=True, with_residual=True):
    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=DEVICE)).to(dtype)
    return (randn(rows, dim), randn(hidden, dim, scale=dim ** -0.5),
            randn(hidden, scale=0.1) if with_bias else None, randn(dim, hidden, scale=hidden ** -0.5),
            randn(dim, scale=0.1) if with_bias else None, randn(rows, dim) if with_residual else None)


def check(rows, dim, hidden, dtype, with_bias=True, with_residual=True):
    args = make(rows, dim, hidden, dtype, with_bias, with_residual)
    ours = rk.mlp(*args, backend="triton")
    theirs = rk.mlp(*args, backend="eager")
    reference = rk.mlp(*[None if a is None else a.double() for a in args], backend="eager")
    assert ours.shape == theirs.shape and ours.dtype == dtype
    assert_flash_rule(ours, theirs, reference, FLOOR[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rows", [1, 37])
def test_matches_eager(rows, with_bias, with_residual, dtype):
    check(rows, 48, 192, dtype, with_bias, with_residual)


def test_gradients_equal_eager():
    grads = {}
    for backend in ("triton", "eager"):
        torch.manual_seed(1)
        leaves = [t.requires_grad_() for t in make(11, 32, 128, torch.float32)]
        rk.mlp(*leaves, backend=backend).pow(2).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for ours, theirs in zip(grads["triton"], grads["eager"]):
        torch.testing.assert_close(ours, theirs)


def test_mixed_dtypes_error_or_fall_back(caplog, monkeypatch):
    # auto sends CPU tensors to packed; take the GPU's fall-back chain through the interpreter
    monkeypatch.setattr(rk._backend, "_on_cpu", lambda args: False)
    args = list(make(5, 16, 64, torch.float32))
    args[2] = args[2].half()
    with pytest.raises(RuntimeError, match="fc1_bias has dtype torch.float16"):
        rk.mlp(*args, backend="triton")
    with caplog.at_level("INFO", logger="recvit_kernels"):
        with pytest.raises(RuntimeError):  # the eager op rejects the mix too, after the logged fall back
            rk.mlp(*args, backend="auto")
    assert "falling back from triton: fc1_bias" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows,dim", [(64 * 197, 768), (8 * 577, 384), (197, 192)])
def test_gpu_real_sizes(rows, dim, dtype):
    check(rows, dim, 4 * dim, dtype)
