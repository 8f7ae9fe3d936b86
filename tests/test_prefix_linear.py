"""prefix_linear: the eager op by its definition, the triton kernel vs an fp64 reference, gradients,
bad input; GPU tests marked gpu."""
import pytest
import torch
import torch.nn.functional as F

import recvit_kernels as rk
from tolerance import assert_flash_rule

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(rows, k_dim, n_out, dtype, with_bias=True, with_residual=True):
    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=DEVICE)).to(dtype)
    return (randn(rows, k_dim), randn(n_out, k_dim, scale=k_dim ** -0.5),
            randn(n_out, scale=0.1) if with_bias else None, randn(rows, n_out) if with_residual else None)


def run(x, weight, bias, live, activation, residual, backend):
    num_rows = torch.tensor([live], device=x.device)
    return rk.prefix_linear(x, weight, bias, num_rows, activation, residual, backend=backend)


def test_eager_is_the_masked_definition():
    x, weight, bias, residual = make(9, 6, 5, torch.float64)
    out = run(x, weight, bias, 4, "gelu", residual, "eager")
    expected = F.gelu(x[:4] @ weight.T + bias) + residual[:4]
    torch.testing.assert_close(out[:4], expected)
    assert torch.equal(out[4:], torch.zeros(5, 5, dtype=torch.float64))
    assert torch.equal(run(x, weight, None, 20, None, None, "packed"), x @ weight.T)
    target = torch.randn(9, 5, dtype=torch.float64)
    kept = target[4:].clone()
    written = rk.prefix_linear(x, weight, bias, torch.tensor([4]), "gelu", residual, out=target)
    assert written is target and torch.equal(target[4:], kept)
    torch.testing.assert_close(target[:4], expected)


triton_only = pytest.mark.skipif(rk.unavailable_reason("triton") is not None,
                                 reason=f"triton backend unavailable: {rk.unavailable_reason('triton')}")


def check(rows, k_dim, n_out, live, dtype, with_bias=True, activation="gelu", with_residual=True):
    x, weight, bias, residual = make(rows, k_dim, n_out, dtype, with_bias, with_residual)
    ours = run(x, weight, bias, live, activation, residual, "triton")
    theirs = run(x, weight, bias, live, activation, residual, "eager")
    reference = run(*[None if t is None else t.double() for t in (x, weight, bias)], live, activation,
                    None if residual is None else residual.double(), "eager")
    assert ours.shape == (rows, n_out) and ours.dtype == dtype
    if live:
        assert_flash_rule(ours[:live], theirs[:live], reference[:live], FLOOR[dtype])
    # nothing is written past M: an out buffer keeps its sentinel there, bit for bit
    target = torch.full((rows, n_out), float("nan"), dtype=dtype, device=x.device)
    with torch.no_grad():
        rk.prefix_linear(x, weight, bias, torch.tensor([live], device=x.device), activation, residual,
                         out=target, backend="triton")
    assert target[live:].isnan().all()
    assert torch.equal(target[:live], ours[:live])


# The interpreter runs 32x32x32 tiles: 70 rows are two full blocks and a partial one.
@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("live", [0, 1, 32, 33, 64, 69, 70, 100],
                         ids=["none", "one", "boundary", "inside", "boundary2", "last", "all", "past"])
def test_triton_live_rows(live, dtype):
    check(70, 24, 40, live, dtype)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_triton_epilogues(with_bias, activation, with_residual, dtype):
    check(45, 40, 24, 37, dtype, with_bias, activation, with_residual)


@triton_only
@pytest.mark.parametrize("rows,k_dim,n_out,live", [(1, 8, 3, 1), (5, 72, 33, 3), (40, 1, 1, 17)])
def test_triton_odd_shapes(rows, k_dim, n_out, live):
    check(rows, k_dim, n_out, live, torch.float32)


@triton_only
def test_triton_strided_operands_and_int32_count():
    x = torch.randn(37, 48)[:, ::2]  # column stride 2
    weight = torch.randn(24, 20).t()  # (20, 24), transposed strides
    residual = torch.randn(20, 37).t()
    num_rows = torch.tensor([21], dtype=torch.int32)
    ours = rk.prefix_linear(x, weight, None, num_rows, residual=residual, backend="triton")
    theirs = rk.prefix_linear(x, weight, None, num_rows, residual=residual, backend="eager")
    torch.testing.assert_close(ours[:21], theirs[:21])


@triton_only
def test_triton_out_may_be_the_residual():
    """The sync-free path's fc2: the live rows of the residual stream are updated in place."""
    x, weight, bias, stream = make(70, 24, 40, torch.float32)
    expected = run(x, weight, bias, 45, None, stream, "eager")
    kept = stream[45:].clone()
    with torch.no_grad():
        rk.prefix_linear(x, weight, bias, torch.tensor([45]), None, stream, out=stream, backend="triton")
    torch.testing.assert_close(stream[:45], expected[:45])
    assert torch.equal(stream[45:], kept)


@triton_only
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_triton_gradients_equal_eager(activation):
    grads = {}
    for backend in ("triton", "eager"):
        torch.manual_seed(1)
        leaves = [t.requires_grad_() for t in make(50, 24, 40, torch.float32)]
        out = run(*leaves[:3], 35, activation, leaves[3], backend)
        (out * torch.randn_like(out)).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for ours, theirs in zip(grads["triton"], grads["eager"]):
        torch.testing.assert_close(ours, theirs)
    assert not grads["triton"][0][35:].any() and not grads["triton"][3][35:].any()


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.zeros(4)), "x: expected 2 dimensions"),
    (dict(x=torch.zeros(4, 6, dtype=torch.int64)), "x: expected a floating dtype"),
    (dict(weight=torch.zeros(5, 7)), r"weight: expected \(out_features, 6\)"),
    (dict(weight=torch.zeros(5, 6, dtype=torch.float64)), "weight: expected dtype torch.float32"),
    (dict(bias=torch.zeros(4)), r"bias: expected \(5,\)"),
    (dict(num_rows=torch.tensor([2.0])), "num_rows: expected dtype"),
    (dict(num_rows=torch.tensor([2, 3])), "num_rows: expected 1 element"),
    (dict(num_rows=torch.tensor([2], device="meta")), "num_rows: expected device cpu"),
    (dict(num_rows=2), "num_rows: expected a torch.Tensor"),
    (dict(activation="relu"), "activation='relu': expected one of"),
    (dict(residual=torch.zeros(4, 6)), r"residual: expected \(4, 5\)"),
    (dict(out=torch.zeros(4, 6)), r"out: expected \(4, 5\)"),
    (dict(out=torch.zeros(5, 4).t()), "out: .*unit column stride"),
    (dict(out=torch.zeros(4, 5), x=torch.zeros(4, 6, requires_grad=True)), "out: writing in place"),
])
def test_bad_input(change, message):
    args = dict(x=torch.zeros(4, 6), weight=torch.zeros(5, 6), bias=torch.zeros(5),
                num_rows=torch.tensor([2]), activation=None, residual=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        rk.prefix_linear(**args, backend="eager")


@triton_only
def test_triton_declines_bfloat16_on_the_interpreter():
    if DEVICE == "cuda":
        pytest.skip("bf16 runs on a GPU")
    x, weight, bias, _ = make(4, 8, 8, torch.bfloat16)
    with pytest.raises(RuntimeError, match="x is bfloat16"):
        run(x, weight, bias, 2, None, None, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("rows,k_dim,n_out", [(64 * 197, 768, 3072), (64 * 197, 3072, 768),
                                              (8 * 577, 384, 1152)])
@pytest.mark.parametrize("fraction", [0.0, 0.37, 1.0])
def test_gpu_real_sizes(rows, k_dim, n_out, fraction, dtype):
    check(rows, k_dim, n_out, int(rows * fraction), dtype)


def test_tiles_follow_the_shape_and_the_fp32_policy(monkeypatch, set_allow_tf32):
    """Few rows get small tiles (enough programs for about one wave), many rows the largest; fp32
    takes the TF32 tiles when torch allows TF32, else the IEEE (FMA) ones."""
    pl = pytest.importorskip("recvit_kernels.triton.prefix_gemm")
    from recvit_kernels.triton._common import dot_precision

    monkeypatch.setattr(pl, "interpreting", lambda: False)
    tiles = pl.TILES["16-bit"]
    assert pl.config(256 * 197, 768, torch.bfloat16) == tiles[0]
    small = pl.config(197, 3072, torch.float16)  # batch-1 fc1
    assert small != tiles[0] and triton_programs(197, 3072, small) >= pl.MIN_PROGRAMS
    assert pl.config(197, 768, torch.bfloat16) == tiles[-1]  # batch-1 proj: the smallest tile
    for allow_tf32, precision in ((False, "ieee"), (True, "tf32")):
        set_allow_tf32(allow_tf32)
        assert dot_precision(torch.float32) == precision
        assert dot_precision(torch.bfloat16) == "tf32"
        assert pl.config(256 * 197, 768, torch.float32) == pl.TILES[precision][0]


def triton_programs(rows, n_out, tile):
    return -(-rows // tile[0]) * -(-n_out // tile[1])


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [197, 64 * 197])
def test_gpu_fp32_tf32_when_torch_allows(rows, set_allow_tf32):
    """With ``allow_tf32`` the kernel runs TF32 as the eager op's cuBLAS GEMM does: flash rule
    against fp64 with TF32 eager as the baseline (the IEEE default is test_gpu_real_sizes' fp32)."""
    set_allow_tf32(True)
    check(rows, 768, 3072, rows // 2, torch.float32)
