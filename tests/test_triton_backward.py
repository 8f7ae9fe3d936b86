"""The Triton backward of the token-wise ops (LayerNorm, prefix linear, MLP epilogues) vs the eager
op's autograd gradients (flash-attention tolerance rule); no eager op is rerun in the backward."""
import pytest
import torch

import recvit_kernels as rk
from tolerance import assert_flash_rule

pytest.importorskip("triton")
if rk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {rk.unavailable_reason('triton')}", allow_module_level=True)

from launches import trace_launches  # noqa: E402

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
ROWS = 37
# the live row counts: none, one, an odd count, every row, past the rows (acts as every row)
LIVE = [0, 1, 13, ROWS, ROWS + 5]


def check_gradients(op, inputs, grad_outputs, live, dtype):
    """Gradients of ``op(*inputs, backend=...)`` for the float inputs (None skipped): Triton's, for
    ``grad_outputs`` as drawn, vs an fp64 eager reference <= 2x eager's error in ``dtype`` + floor,
    the eager ones for ``grad_outputs`` zeroed at the rows >= ``live`` (those output rows are
    unspecified, constants to autograd; None: every row is live). Returns Triton's gradients."""
    masked = grad_outputs
    if live is not None:
        live_rows = (torch.arange(grad_outputs[0].shape[0], device=DEVICE) < live)[:, None]
        masked = [g * live_rows for g in grad_outputs]
    grads = {}
    for name, precision, backend, given in (("ours", dtype, "triton", grad_outputs),
                                            ("theirs", dtype, "eager", masked),
                                            ("reference", torch.float64, "eager", masked)):
        leaves = [t if t is None or not t.is_floating_point() else
                  t.detach().to(precision).requires_grad_() for t in inputs]
        outputs = op(*leaves, backend=backend)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, [g.to(precision) for g in given])
        grads[name] = [t.grad for t in leaves if t is not None and t.is_floating_point()]
    for ours, theirs, reference in zip(grads["ours"], grads["theirs"], grads["reference"]):
        assert ours.dtype == dtype and ours.shape == reference.shape
        assert_flash_rule(ours, theirs, reference, FLOOR[dtype])
    return grads["ours"]


def randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE) * scale


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("live", LIVE[:4] + [None])
def test_layer_norm_backward(live, bias, residual, dtype):
    width = 40
    inputs = [randn(ROWS, width), 1 + randn(width, scale=0.1), randn(width) if bias else None,
              randn(ROWS, width) if residual else None]
    num_rows = None if live is None else torch.tensor([live], device=DEVICE)

    def op(x, weight, bias, residual, backend):
        return rk.layer_norm(x, weight, bias, 1e-6, residual, num_rows=num_rows, backend=backend)

    grad_outputs = [randn(ROWS, width) for _ in range(2 if residual else 1)]
    grads = check_gradients(op, inputs, grad_outputs, live, dtype)
    if live is not None:
        assert not grads[0][live:].any(), "rows past num_rows get no gradient"
        if residual:
            assert torch.equal(grads[0], grads[-1]), "x and the residual share the gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("width", [200, 1500])
def test_layer_norm_backward_rows_of_a_3d_input(width, dtype):
    """Without num_rows, x (B, N, C) with a non-power-of-2 C (1500: one row a program, 8 warps)
    and a strided residual."""
    inputs = [randn(2, 9, width), 1 + randn(width, scale=0.1), randn(width), randn(2, 9, 2 * width)[..., ::2]]
    check_gradients(lambda *args, backend: rk.layer_norm(*args[:3], 1e-5, args[3], backend=backend),
                    inputs, [randn(2, 9, width), randn(2, 9, width)], None, dtype)


LINEAR_FORMS = [(True, None, False), (True, "gelu", False), (True, None, True), (False, "gelu", True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias, activation, residual", LINEAR_FORMS,
                         ids=["bias", "bias_gelu", "bias_residual", "gelu_residual"])
@pytest.mark.parametrize("live", LIVE)
def test_prefix_linear_backward(live, bias, activation, residual, dtype):
    in_features, out_features = 40, 24
    inputs = [randn(ROWS, in_features), randn(out_features, in_features, scale=in_features ** -0.5),
              randn(out_features) if bias else None, randn(ROWS, out_features) if residual else None]
    num_rows = torch.tensor([live], device=DEVICE)

    def op(x, weight, bias, residual, backend):
        return rk.prefix_linear(x, weight, bias, num_rows, activation, residual, backend=backend)

    grads = check_gradients(op, inputs, [randn(ROWS, out_features)], live, dtype)
    assert not grads[0][live:].any(), "rows past num_rows get no gradient"
    if residual:
        assert not grads[-1][live:].any()
    if live == 0:
        assert not any(grad.any() for grad in grads), "no live row: every gradient is zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_prefix_linear_backward_strided(dtype):
    """x a strided view, the weight transposed, the output gradient non-contiguous; 70 rows and
    several tiles each way."""
    weight = randn(40, 52, scale=40 ** -0.5).t()
    inputs = [randn(70, 80)[:, ::2], weight, randn(52), randn(70, 52)]
    num_rows = torch.tensor([67], device=DEVICE)
    check_gradients(lambda x, w, b, r, backend: rk.prefix_linear(x, w, b, num_rows, "gelu", r, backend=backend),
                    inputs, [randn(52, 70).t()], 67, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_mlp_epilogue_backward(residual, bias, dtype):
    """Through the MLP (cuBLAS GEMMs, Triton epilogues): every input's gradient."""
    inputs = [randn(ROWS, 24), randn(40, 24, scale=0.2), randn(40) if bias else None, randn(24, 40, scale=0.15),
              randn(24) if bias else None, randn(ROWS, 24) if residual else None]
    check_gradients(rk.mlp, inputs, [randn(ROWS, 24)], None, dtype)


# what rerunning the eager ops forward and backward would launch
EAGER_OPS = {"native_layer_norm", "native_layer_norm_backward", "mm", "addmm", "bmm", "gelu", "gelu_backward",
             "where", "mul", "arange", "lt"}


def test_backward_reruns_no_eager_op():
    """The backward runs the Triton kernels and no eager LayerNorm, GEMM, GELU or row mask (aten ops
    left: the gradients' zero rows, the weight gradients' last sums, autograd's accumulation)."""
    x, residual = randn(37, 24).requires_grad_(), randn(37, 24).requires_grad_()
    weight, bias = randn(24, 24).requires_grad_(), randn(24).requires_grad_()
    count = torch.tensor([13], device=DEVICE)
    normed, summed = rk.layer_norm(x, weight[0], bias, 1e-6, residual=residual, num_rows=count,
                                   backend="triton")
    hidden = rk.prefix_linear(normed, weight, bias, count, "gelu", backend="triton")
    out = rk.prefix_linear(hidden, weight, bias, count, None, summed, backend="triton")
    with trace_launches(execute=True) as trace:
        out.sum().backward()
    kernels = [launch.name for launch in trace.launches if launch.kind == "triton"]
    assert sorted(kernels) == sorted(["_layer_norm_backward_kernel", "_prefix_linear_grad_rows_kernel",
                                      "_prefix_linear_grad_rows_kernel", "_prefix_linear_kernel",
                                      "_prefix_linear_kernel", "_prefix_linear_dweight_kernel",
                                      "_prefix_linear_dweight_kernel"]), kernels
    aten = {launch.name for launch in trace.launches if launch.kind == "aten"}
    assert not aten & EAGER_OPS, aten
    assert "sum" in aten  # the weight gradients' last reduction is traced (the check can fail)


# ---------------------------------------------------------------- GPU (skipped without CUDA)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_gpu_backward_real_sizes(dtype):
    """Base's widths at batch 2 (394 rows, 300 live): LayerNorm with the residual, fc1 with GELU,
    fc2 with the residual; and no host sync in the backward."""
    rows, live, dim, hidden = 394, 300, 768, 3072
    num_rows = torch.tensor([live], device=DEVICE)

    def layer_norm(x, weight, bias, residual, backend):
        return rk.layer_norm(x, weight, bias, 1e-6, residual, num_rows=num_rows, backend=backend)

    check_gradients(layer_norm, [randn(rows, dim), 1 + randn(dim, scale=0.1), randn(dim), randn(rows, dim)],
                    [randn(rows, dim), randn(rows, dim)], live, dtype)
    for k_dim, n_out, activation, residual in ((dim, hidden, "gelu", False), (hidden, dim, None, True)):
        def linear(x, weight, bias, residual, backend):
            return rk.prefix_linear(x, weight, bias, num_rows, activation, residual, backend=backend)

        check_gradients(linear, [randn(rows, k_dim), randn(n_out, k_dim, scale=k_dim ** -0.5), randn(n_out),
                                 randn(rows, n_out) if residual else None], [randn(rows, n_out)], live, dtype)
    x, weight = randn(rows, dim).to(dtype).requires_grad_(), randn(hidden, dim).to(dtype).requires_grad_()
    out = rk.prefix_linear(rk.layer_norm(x, weight[0, :dim], None, num_rows=num_rows, backend="triton"),
                           weight, None, num_rows, "gelu", backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out.backward(torch.randn_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
