"""Microbenchmarks of each op and backend: ``pytest benchmarks/ --benchmark-only``.

One benchmark per (op, backend) on fresh random inputs: Base width (C = 768, 12 heads of 64,
N0 = 197, batch 32, bf16) on a GPU, Tiny width (C = 192, batch 4, fp32) on the CPU. Depths follow
the paper profile of :mod:`recvit.bench`; the attention and token-wise ops see the step-6 active set.
A backend that cannot run here is skipped with its reason (Triton on the CPU only has its
interpreter, which is a correctness tool, not something to time).
"""
from __future__ import annotations

import pytest
import torch

import recvit_kernels as rk
from recvit.bench import profile_depths

pytest.importorskip("pytest_benchmark")

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH, TOKENS, DIM, HEADS, STEPS = (32, 197, 768, 12, 12) if GPU else (4, 197, 192, 3, 12)
STEP = 6
BACKENDS = ("eager", "packed", "triton", "cuda")


def _skip_unless_runs(backend: str) -> None:
    reason = rk.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if backend == "triton" and not GPU:
        pytest.skip("triton: only the interpreter runs on the CPU; not timed")


def _run(benchmark, fn, *args, **kwargs):
    def call():
        out = fn(*args, **kwargs)
        if GPU:
            torch.cuda.synchronize()
        return out

    call()  # compile / warm up outside the timing
    return benchmark(call)


@pytest.fixture(scope="module")
def layout_inputs():
    depths = profile_depths("paper", BATCH, TOKENS, STEPS, torch.Generator().manual_seed(0)).to(DEVICE)
    layout = rk.depth_sort(depths, STEPS, backend="packed")
    rows = int(layout.step_rows[STEP - 1])
    return depths, layout, rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_depth_sort(benchmark, backend, layout_inputs):
    _skip_unless_runs(backend)
    depths = layout_inputs[0]
    _run(benchmark, rk.depth_sort, depths, STEPS, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention(benchmark, backend, layout_inputs):
    _skip_unless_runs(backend)
    _, layout, rows = layout_inputs
    q, k, v = (torch.randn(rows, HEADS, DIM // HEADS, device=DEVICE, dtype=DTYPE) for _ in range(3))
    query_rows = layout.attention_rows(STEP, rows)
    cu = layout.cu_seqlens[STEP - 1]
    _run(benchmark, rk.varlen_attention, q, k, v, cu, cu, TOKENS, TOKENS,
         q_rows=query_rows, kv_rows=query_rows, backend=backend)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm(benchmark, backend, residual, layout_inputs):
    _skip_unless_runs(backend)
    rows = layout_inputs[2]
    x = torch.randn(rows, DIM, device=DEVICE, dtype=DTYPE)
    weight, bias = torch.randn(DIM, device=DEVICE, dtype=DTYPE), torch.randn(DIM, device=DEVICE, dtype=DTYPE)
    extra = torch.randn_like(x) if residual else None
    _run(benchmark, rk.layer_norm, x, weight, bias, 1e-6, extra, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp(benchmark, backend, layout_inputs):
    _skip_unless_runs(backend)
    rows = layout_inputs[2]
    x = torch.randn(rows, DIM, device=DEVICE, dtype=DTYPE)
    fc1 = torch.randn(4 * DIM, DIM, device=DEVICE, dtype=DTYPE) * DIM ** -0.5
    fc2 = torch.randn(DIM, 4 * DIM, device=DEVICE, dtype=DTYPE) * (4 * DIM) ** -0.5
    b1, b2 = torch.randn(4 * DIM, device=DEVICE, dtype=DTYPE), torch.randn(DIM, device=DEVICE, dtype=DTYPE)
    _run(benchmark, rk.mlp, x, fc1, b1, fc2, b2, torch.randn_like(x), backend=backend)


@pytest.mark.parametrize("epilogue", ["gelu", "residual"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_linear(benchmark, backend, epilogue, layout_inputs):
    """The sync-free path's fc1 (bias + GELU) / fc2 (bias + residual) GEMM: all B*N rows given,
    the step's live count on the device."""
    _skip_unless_runs(backend)
    _, layout, _ = layout_inputs
    total = BATCH * TOKENS
    k_dim, n_out = (DIM, 4 * DIM) if epilogue == "gelu" else (4 * DIM, DIM)
    x = torch.randn(total, k_dim, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(n_out, k_dim, device=DEVICE, dtype=DTYPE) * k_dim ** -0.5
    bias = torch.randn(n_out, device=DEVICE, dtype=DTYPE)
    residual = torch.randn(total, n_out, device=DEVICE, dtype=DTYPE) if epilogue == "residual" else None
    activation = "gelu" if epilogue == "gelu" else None
    _run(benchmark, rk.prefix_linear, x, weight, bias, layout.step_rows[STEP - 1:STEP], activation,
         residual, backend=backend)
