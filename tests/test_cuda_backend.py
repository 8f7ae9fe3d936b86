"""The ``cuda`` backend: availability reporting and fall back (CPU), the pure-Python CPU build, and,
on a GPU (marked gpu), every kernel against the eager reference."""
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import recvit_kernels as rk
from recvit_kernels import _backend
from recvit_kernels.depth_sort import DepthLayout, _depth_sort_eager
from tolerance import assert_flash_rule

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
PROFILES = ("random", "all_one", "all_deep", "one_token", "cls_deep")


def profile_depths(profile, batch, tokens, num_steps, device="cpu"):
    """(B, N) int64 depths in 1..num_steps following a named profile."""
    if profile == "random":
        depths = torch.randint(1, num_steps + 1, (batch, tokens))
    elif profile == "all_one":
        depths = torch.ones(batch, tokens, dtype=torch.long)
    elif profile == "all_deep":
        depths = torch.full((batch, tokens), num_steps, dtype=torch.long)
    elif profile == "one_token":  # a single token of the whole batch goes past step 1
        depths = torch.ones(batch, tokens, dtype=torch.long)
        depths[batch - 1, tokens // 2] = num_steps
    elif profile == "cls_deep":  # the model's shape: [CLS] at L, the rest skewed shallow
        depths = (torch.rand(batch, tokens) ** 2 * num_steps).long().clamp(1, num_steps)
        depths[:, 0] = num_steps
    else:
        raise ValueError(profile)
    return depths.to(device)


# ---------------------------------------------------------------- CPU: availability and fall back

needs_no_cuda_backend = pytest.mark.skipif(
    rk.unavailable_reason("cuda") is None, reason="the cuda backend is available here")


@needs_no_cuda_backend
def test_unavailable_backend_reports_its_reason():
    reason = rk.available_backends()["cuda"]
    assert isinstance(reason, str) and reason
    if torch.version.cuda is None:
        assert "without CUDA" in reason


@needs_no_cuda_backend
def test_explicit_cuda_backend_raises_with_the_reason():
    reason = rk.unavailable_reason("cuda")
    depths = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="backend='cuda'") as info:
        rk.depth_sort(depths, 3, backend="cuda")
    assert reason in str(info.value)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="layer_norm: backend='cuda'"):
        rk.layer_norm(x, torch.ones(8), None, backend="cuda")
    q = torch.randn(4, 1, 64)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="varlen_attention: backend='cuda'"):
        rk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="cuda")
    weight = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="prefix_linear: backend='cuda'"):
        rk.prefix_linear(x, weight, None, torch.tensor([2]), backend="cuda")
    with pytest.raises(RuntimeError, match="mlp: backend='cuda'"):
        rk.mlp(x, weight, None, weight, None, backend="cuda")


@needs_no_cuda_backend
def test_auto_falls_back_from_cuda_and_logs(caplog, monkeypatch):
    """``auto`` passes over the unavailable cuda backend with a logged reason. (CPU tensors go
    straight to ``packed``, so the dispatch is shown on meta tensors, which it only inspects.)"""
    monkeypatch.setattr(_backend, "_logged_fallbacks", set())
    depths = torch.empty(2, 7, dtype=torch.long, device="meta")
    with caplog.at_level(logging.INFO, logger="recvit_kernels"):
        implementation = _backend.dispatch("depth_sort", "auto", depths, 4)
    assert f"depth_sort: falling back from cuda: {rk.unavailable_reason('cuda')}" in caplog.text
    assert implementation is _depth_sort_eager


def test_named_cuda_hands_declined_calls_on(caplog, monkeypatch):
    """backend="cuda", available, hands a call its kernels decline (fp32 attention; inputs that
    require grad, i.e. training) to triton, then packed, logged, as the README says; a call they
    take stays on cuda. Simulated on the CPU: cuda marked available, its device check passed, triton
    unavailable. (A named triton raises on a call it declines: test_triton_attention.)"""
    from recvit_kernels.cuda import layer_norm as cuda_norm
    from recvit_kernels.cuda import varlen_attention as cuda_attention

    rk.available_backends()
    monkeypatch.setattr(_backend, "_logged_fallbacks", set())
    monkeypatch.setitem(_backend._AVAILABILITY, "cuda", lambda: None)
    monkeypatch.setitem(_backend._AVAILABILITY, "triton", lambda: "not here")
    for glue in (cuda_attention, cuda_norm):
        monkeypatch.setattr(glue, "device_reason", lambda name, tensor: None)
    monkeypatch.setattr(cuda_attention, "_supports_head_dim", lambda head_dim: True)
    q, cu = torch.randn(6, 2, 32), torch.tensor([0, 2, 6], dtype=torch.int32)
    implementations = _backend._IMPLEMENTATIONS
    assert _backend.dispatch("varlen_attention", "cuda", q.half(), q.half(), q.half(), cu, cu, 4, 4,
                             0.1) is implementations["varlen_attention"]["cuda"]
    with _backend.recorded_fallbacks() as fallbacks, caplog.at_level(logging.INFO, logger="recvit_kernels"):
        out = rk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="cuda")
        x, weight = torch.randn(3, 8, requires_grad=True), torch.ones(8)
        rk.layer_norm(x, weight, None, backend="cuda").sum().backward()
    torch.testing.assert_close(out, rk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="eager"))
    assert x.grad is not None
    assert fallbacks == [
        ("varlen_attention", "cuda", "q has dtype torch.float32; the cuda attention takes float16 and bfloat16",
         "packed"),
        ("varlen_attention", "triton", "not here", "packed"),
        ("layer_norm", "cuda", "the cuda kernels are forward-only and an input requires grad", "packed"),
        ("layer_norm", "triton", "not here", "packed")]
    assert "varlen_attention: falling back from cuda: q has dtype torch.float32" in caplog.text
    assert "layer_norm: falling back from cuda: the cuda kernels are forward-only" in caplog.text


def test_loader_reasons(monkeypatch):
    """The loader names what is missing at each stage (simulated where this machine differs)."""
    from recvit_kernels import cuda as backend

    monkeypatch.setattr(torch.version, "cuda", None)
    assert "built without CUDA" in backend._load()[1]
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in backend._load()[1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert "sm_80" in backend._load()[1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setitem(sys.modules, "recvit_kernels.cuda._C", None)  # no prebuilt extension
    monkeypatch.delattr(backend, "_C", raising=False)
    monkeypatch.setattr(backend, "find_cuda_home", lambda: (None, "nvcc not found (set CUDA_HOME)"))
    module, reason = backend._load()
    assert module is None and "no CUDA toolkit was found: nvcc not found" in reason
    assert "JIT build failed" in reason


def test_jit_build_uses_the_toolkit_found(monkeypatch, tmp_path):
    """The JIT build hands torch the toolkit ``find_cuda_home`` found, not torch's own guess (the
    folder above ``which nvcc``, wrong where nvcc is a wrapper script)."""
    import torch.utils.cpp_extension as cpp_extension
    from recvit_kernels import cuda as backend

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local")  # torch's guess for the wrapper
    monkeypatch.setattr(backend, "find_cuda_home", lambda: (tmp_path, "a test"))
    seen = {}

    def load(name, sources, **kwargs):
        seen.update(name=name, cuda_home=cpp_extension.CUDA_HOME, sources=sources)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", load)
    assert backend._jit_build() == "module"
    assert seen["cuda_home"] == str(tmp_path) and seen["name"] == backend.EXTENSION_NAME
    assert [Path(source).name for source in seen["sources"]] == list(backend.SOURCES)


def test_kernel_sources_are_found():
    from recvit_kernels import cuda as backend

    assert backend.source_dir() == ROOT / "csrc"


def test_cpu_build_is_pure_python(tmp_path):
    """Without a CUDA torch, ``pip wheel`` gives a py3-none-any wheel shipping the kernel sources."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("recvit", "recvit_kernels", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ)
    if torch.version.cuda is not None:  # a CUDA torch would build the extension: use the switch
        env["RECVIT_SKIP_CUDA_BUILD"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    assert wheel.name.endswith("py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if name.endswith((".so", ".pyd"))]
    from recvit_kernels.cuda import HEADERS, SOURCES

    assert {"prefix_linear.cu", "linear_epilogue.cu", "mma_sm80.cuh"} <= set(SOURCES + HEADERS)
    for name in SOURCES + HEADERS:
        assert f"recvit_kernels/cuda/csrc/{name}" in names
    assert sorted(path.name for path in (ROOT / "csrc").iterdir()
                  if path.suffix in (".cu", ".cuh", ".h", ".cpp")) == sorted(SOURCES + HEADERS)


def test_gemm_ops_decline_what_the_kernels_cannot_run():
    """The cuda prefix_linear and mlp name why they decline a call (so ``auto`` moves on): dtype,
    K granularity, mixed dtypes, a CPU tensor, autograd."""
    from recvit_kernels.cuda.mlp import _supports as mlp_supports
    from recvit_kernels.cuda.prefix_linear import _supports as linear_supports

    count = torch.tensor([3])
    x = torch.randn(5, 16, dtype=torch.float16)
    w = torch.randn(24, 16, dtype=torch.float16)
    assert "float16 and bfloat16" in linear_supports(x.float(), w.float(), None, count, None, None)
    assert "in_features=12 is not a multiple of 8" in linear_supports(x[:, :12], w[:, :12], None,
                                                                      count, None, None)
    assert "x is on cpu" in linear_supports(x, w, None, count, None, None)
    w2 = torch.randn(16, 24, dtype=torch.float16)
    assert "x has dtype torch.int32" in mlp_supports(x.int(), w, None, w2, None, None)
    assert "fc2_bias has dtype torch.float32, x has torch.float16" in mlp_supports(
        x, w, None, w2, torch.zeros(16), None)
    assert "x is on cpu" in mlp_supports(x.float(), w.float(), None, w2.float(), None, None)
    from recvit_kernels.cuda import grad_reason
    assert "forward-only" in grad_reason(x, w.requires_grad_())


def test_python_limits_match_the_kernel_header():
    """The Python-side limits of the cuda prefix_linear and layer_norm equal the constants the
    kernels are built with (csrc/recvit_kernels.h), so their declines match the binding's errors."""
    from recvit_kernels.cuda import layer_norm as norm_glue
    from recvit_kernels.cuda import prefix_linear as glue

    header = (ROOT / "csrc" / "recvit_kernels.h").read_text()
    assert f"kPrefixLinearKMultiple = {glue.K_MULTIPLE};" in header
    assert "kMaxPrefixLinearRows = 65535LL * 128;" in header and glue.MAX_ROWS == 65535 * 128
    assert f"kMaxLayerNormWidth = {norm_glue.MAX_WIDTH};" in header


def test_layer_norm_declines_what_the_kernel_cannot_run():
    """The cuda layer_norm reads weight and bias in x's dtype or float32 (both the same) and names
    why it declines anything else (so ``auto`` moves on): dtypes, width, a CPU tensor, autograd."""
    from recvit_kernels.cuda.layer_norm import MAX_WIDTH, _supports

    x = torch.randn(5, 16, dtype=torch.bfloat16)
    w = torch.randn(16, dtype=torch.bfloat16)
    assert "x has dtype torch.float64" in _supports(x.double(), w, None, 1e-6, None)
    assert "residual has dtype torch.float16" in _supports(x, w, None, 1e-6, x.half())
    assert "weight has dtype torch.float16" in _supports(x, w.half(), None, 1e-6, None)
    assert "weight has dtype torch.bfloat16" in _supports(x.float(), w, None, 1e-6, None)
    assert "bias has dtype torch.float32, weight has torch.bfloat16" in _supports(
        x, w, w.float(), 1e-6, None)
    wide = torch.randn(2, MAX_WIDTH + 1, dtype=torch.bfloat16)
    assert f"limit of {MAX_WIDTH}" in _supports(wide, torch.ones(MAX_WIDTH + 1), None, 1e-6, None)
    for weight, bias in ((w, w), (w.float(), w.float()), (w.float(), None)):  # accepted dtypes
        assert "x is on cpu" in _supports(x, weight, bias, 1e-6, x)
    assert "x is on cpu" in _supports(x.float(), w.float(), None, 1e-6, None)


def test_layer_norm_glue_passes_weights_and_count_as_they_are(monkeypatch):
    """The glue hands the extension the caller's weight and bias themselves (no cast or copy that a
    captured CUDA graph would keep reading after a weight change) and the live row count."""
    from recvit_kernels.cuda import layer_norm as glue

    calls = []
    x, weight, bias = torch.randn(6, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16), None
    out, summed = torch.empty_like(x), torch.empty_like(x)  # new tensors, as the kernel returns

    class Extension:
        @staticmethod
        def layer_norm(*args):
            calls.append(args)
            return out, summed

    monkeypatch.setattr(glue, "extension", lambda: Extension)
    count = torch.tensor([4], dtype=torch.int32)
    assert glue.layer_norm_cuda(x, weight, bias, 1e-5, None, num_rows=count) is out
    full, shift = weight.float(), torch.randn(8)
    assert glue.layer_norm_cuda(x, full, shift, 1e-5, x) == (out, summed)
    (x1, w1, b1, eps1, r1, n1), (_, w2, b2, _, r2, n2) = calls
    assert x1 is x and w1 is weight and b1 is None and eps1 == 1e-5 and r1 is None and n1 is count
    assert w2 is full and b2 is shift and r2 is x and n2 is None


# ---------------------------------------------------------------- CPU: the kernels' algorithms
# No GPU runs here, so these emulate csrc/depth_sort.cu and csrc/varlen_attention.cu step by step
# (same loops, same index arithmetic; lanes and warps as tensor dimensions) and compare the result
# with the eager ops. The tensor-core instruction is modelled from the PTX ISA's fragment layouts
# for mma.m16n8k16 (.f16/.bf16), independently of how the kernel fills its fragments. Keep these in
# step with the kernels.

def emulate_depth_sort(depths, num_steps, threads=256):
    """csrc/depth_sort.cu's two kernels, one image (block) at a time."""
    batch, tokens = depths.shape
    warps, buckets = threads // 32, num_steps + 1
    clamped = depths.clamp(1, num_steps).to(torch.int64)
    lane = torch.arange(threads) % 32
    warp = torch.arange(threads) // 32
    histogram = torch.zeros(batch, buckets, dtype=torch.int64)
    rank = torch.zeros(batch, tokens, dtype=torch.int64)
    for image in range(batch):  # histogram_rank_kernel
        running = torch.zeros(buckets, dtype=torch.int64)
        for start in range(0, tokens, threads):
            token = start + torch.arange(threads)
            live = token < tokens
            depth = torch.where(live, clamped[image, token.clamp_max(tokens - 1)], 0)
            same = (depth[:, None] == depth[None, :]) & (warp[:, None] == warp[None, :])
            peers = same.sum(1)  # __popc(__match_any_sync(...))
            rank_in_warp = (same & (lane[None, :] < lane[:, None])).sum(1)
            warp_offsets = torch.zeros(warps, buckets, dtype=torch.int64)
            leader = rank_in_warp == 0
            warp_offsets[warp[leader], depth[leader]] = peers[leader]
            exclusive = running + warp_offsets.cumsum(0) - warp_offsets
            running = running + warp_offsets.sum(0)
            rank[image, token[live]] = (exclusive[warp, depth] + rank_in_warp)[live]
        histogram[image] = running
        histogram[image, 0] = 0
    perm = torch.empty(batch * tokens, dtype=torch.int64)
    inverse_perm, image_order = torch.empty_like(perm), torch.empty_like(perm)
    step_rows = torch.empty(num_steps, dtype=torch.int64)
    image_lengths = torch.empty(num_steps, batch, dtype=torch.int32)
    cu_seqlens = torch.empty(num_steps, batch + 1, dtype=torch.int32)
    for image in range(batch):  # scatter_kernel
        total, before, own = histogram.sum(0), histogram[:image].sum(0), histogram[image]
        global_start = torch.zeros(buckets, dtype=torch.int64)
        image_start = torch.zeros(buckets, dtype=torch.int64)
        deeper = deeper_up_to_image = deeper_in_image = 0
        for depth in range(num_steps, 0, -1):
            global_start[depth] = deeper + before[depth]
            image_start[depth] = deeper_in_image
            deeper += int(total[depth])
            deeper_in_image += int(own[depth])
            deeper_up_to_image += int(before[depth] + own[depth])
            image_lengths[depth - 1, image] = deeper_in_image
            cu_seqlens[depth - 1, image + 1] = deeper_up_to_image
            if image == 0:
                cu_seqlens[depth - 1, 0] = 0
                step_rows[depth - 1] = deeper
        depth, r = clamped[image], rank[image]
        flat = image * tokens + torch.arange(tokens)
        position = global_start[depth] + r
        perm[position] = flat
        inverse_perm[flat] = position
        image_order[image * tokens + image_start[depth] + r] = position
    return DepthLayout(batch, tokens, num_steps, perm, inverse_perm, step_rows, image_lengths,
                       cu_seqlens, image_order)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("batch,tokens,num_steps", [(1, 197, 12), (3, 50, 5), (2, 600, 3),
                                                   (4, 33, 1), (2, 7, 40)])
def test_emulated_depth_sort_equals_argsort_reference(profile, batch, tokens, num_steps):
    torch.manual_seed(0)
    depths = profile_depths(profile, batch, tokens, num_steps)
    emulated = emulate_depth_sort(depths, num_steps)
    assert_layouts_equal(emulated, _depth_sort_eager(depths, num_steps))


@pytest.fixture
def one_thread():
    """The emulations run thousands of tiny batched matmuls: one thread is many times faster than
    two on a busy 2-core machine (thread hand-off dominates)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LANE = torch.arange(32)
GROUP, PAIR = LANE // 4, (LANE % 4) * 2  # groupID, 2 * threadID_in_group


# Fragment element i (a0..a7, b0..b3, c0..c3) of each lane, per the PTX ISA's m16n8k16 .f16/.bf16
# layout: a_i at row groupID (+8 for i in 2,3,6,7), col 2*tig + (i&1) (+8 for i >= 4); b_i at row
# 2*tig + (i&1) (+8 for i >= 2), col groupID; c_i at row groupID (+8 for i >= 2), col 2*tig + (i&1).
_A_I, _BC_I = torch.arange(8)[None], torch.arange(4)[None]
A_ROW, A_COL = GROUP[:, None] + 8 * ((_A_I // 2) % 2), PAIR[:, None] + (_A_I & 1) + 8 * (_A_I >= 4)
B_ROW, B_COL = PAIR[:, None] + (_BC_I & 1) + 8 * (_BC_I >= 2), GROUP[:, None].expand(32, 4)
C_ROW, C_COL = GROUP[:, None] + 8 * (_BC_I >= 2), PAIR[:, None] + (_BC_I & 1)


def ptx_mma(d, a, b):
    """D += A B for every warp (leading dim), per the PTX ISA's m16n8k16 .f16/.bf16 fragments.

    a: (W, 32, 4, 2) halves a0..a7 per lane, b: (W, 32, 2, 2) b0..b3, d: (W, 32, 4) c0..c3.
    """
    w = a.shape[0]
    matrix_a = torch.zeros(w, 16, 16)
    matrix_b = torch.zeros(w, 16, 8)
    matrix_a[:, A_ROW, A_COL] = a.reshape(w, 32, 8)
    matrix_b[:, B_ROW, B_COL] = b.reshape(w, 32, 4)
    d += (matrix_a @ matrix_b)[:, C_ROW, C_COL]


def ptx_ldmatrix_x4(tile, rows, cols, trans=False):
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 for a batch of warps, per the PTX ISA.

    tile (W, R, C): each warp's view of shared memory; rows, cols (W, 32): lane l gives the address
    of row l % 8 of 8x8 matrix l // 8, eight consecutive 16-bit elements from (rows[l], cols[l]),
    16-byte aligned. Returns (W, 32, 4, 2): register i of lane t holds elements
    (t // 4, 2 (t % 4) + e) of matrix i, or with .trans its elements (2 (t % 4) + e, t // 4).
    An address outside the tile raises (IndexError), as it would read another tile in the kernel.
    """
    assert bool((cols % 8 == 0).all()), "ldmatrix row addresses must be 16-byte aligned"
    assert bool((cols + 8 <= tile.shape[2]).all()), "an ldmatrix row crosses the tile's edge"
    w = tile.shape[0]
    batch = torch.arange(w)[:, None, None, None]
    matrices = tile[batch, rows.reshape(w, 4, 8)[..., None],
                    cols.reshape(w, 4, 8)[..., None] + torch.arange(8)]  # (W, 4, 8, 8)
    if trans:
        matrices = matrices.transpose(-1, -2)
    which = torch.arange(4)[None, :, None]
    row = (LANE // 4)[:, None, None]
    col = (2 * (LANE % 4))[:, None, None] + torch.arange(2)
    return matrices[:, which, row, col]


def table_rows(first, count, rows, total, size=64):
    """position_row() for the ``size`` positions of a tile: the row, or -1 (zero-filled / skipped)."""
    position = first + torch.arange(size)
    ok = (torch.arange(size) < count) & (position >= 0)
    if rows is not None:
        ok &= position < rows.numel()
        row = rows.to(torch.int64)[position.clamp(0, max(rows.numel() - 1, 0))] if rows.numel() \
            else torch.full((size,), -1)
    else:
        row = position
    ok &= (row >= 0) & (row < total)
    return torch.where(ok, row, -1)


def emulate_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, q_rows=None, kv_rows=None,
                             dtype=torch.float16, seqused_q=None, seqused_k=None):
    """csrc/varlen_attention.cu, block by block, the heads batched with the 4 warps (W = 4 H);
    q/k/v float32 holding ``dtype`` values. cp.async's double buffering only reorders copies, so
    each tile is loaded when it is used."""
    _, heads, dim = q.shape
    w = 4 * heads
    out = torch.zeros_like(q)
    rnd = lambda t: t.to(dtype).float()  # noqa: E731  Pack<T>::two's rounding
    warp = torch.arange(4).repeat(heads)[:, None]  # (W, 1)
    head_of = torch.arange(heads).repeat_interleave(4)[:, None]
    row0 = warp * 16 + GROUP  # (W, 32)
    lane = LANE.expand(w, 32)
    # the kernel's ldmatrix.x4 row addresses
    a_row, a_col = warp * 16 + lane % 16, (lane // 16) * 8
    k_row, k_col = (lane // 16) * 8 + lane % 8, ((lane // 8) % 2) * 8
    v_row, v_col = ((lane // 8) % 2) * 8 + lane % 8, (lane // 16) * 8

    def load_tile(x, first, count, rows):  # (W, 64, D): rows past count or the tables are zero
        row = table_rows(first, count, rows, x.shape[0])
        tile = torch.where((row >= 0)[:, None, None], x[row.clamp(min=0)], 0.0)  # (64, H, D)
        return tile.permute(1, 0, 2).repeat_interleave(4, 0)

    for segment in range(cu_q.numel() - 1):
        q_start, k_start = int(cu_q[segment]), int(cu_k[segment])
        q_len, k_len = int(cu_q[segment + 1]) - q_start, int(cu_k[segment + 1]) - k_start
        if seqused_q is not None:
            q_len = min(q_len, int(seqused_q[segment]))
        if seqused_k is not None:
            k_len = min(k_len, int(seqused_k[segment]))
        q_len, k_len = min(max(q_len, 0), max_q), min(max(k_len, 0), max_k)
        for m_block in range((max_q + 63) // 64):
            m_first = m_block * 64
            if m_first >= q_len:
                continue  # the block returns
            q_count = min(q_len - m_first, 64)
            q_tile = load_tile(q, q_start + m_first, q_count, q_rows)
            o_acc = torch.zeros(dim // 8, w, 32, 4)
            row_max = torch.full((2, w, 32), -math.inf)
            row_sum = torch.zeros(2, w, 32)
            scale_log2 = scale * 1.4426950408889634
            for n_first in range(0, k_len, 64):
                k_count = min(k_len - n_first, 64)
                k_tile = load_tile(k, k_start + n_first, k_count, kv_rows)
                v_tile = load_tile(v, k_start + n_first, k_count, kv_rows)
                s_acc = torch.zeros(8, w, 32, 4)
                for kk in range(dim // 16):
                    q_frag = ptx_ldmatrix_x4(q_tile, a_row, kk * 16 + a_col)
                    for j in range(0, 8, 2):
                        b = ptx_ldmatrix_x4(k_tile, j * 8 + k_row, kk * 16 + k_col)
                        ptx_mma(s_acc[j], q_frag, b[:, :, 0:2])
                        ptx_mma(s_acc[j + 1], q_frag, b[:, :, 2:4])
                column = torch.arange(8)[:, None] * 8 + PAIR[None, :]  # (8, 32)
                for e in range(4):
                    valid = (column + (e & 1) < k_count)[:, None, :]
                    s_acc[..., e] = torch.where(valid, s_acc[..., e] * scale_log2, -math.inf)
                alpha = torch.empty(2, w, 32)
                for h in range(2):
                    tile_max = s_acc[..., 2 * h:2 * h + 2].amax((0, 3))  # (W, 32)
                    tile_max = tile_max.reshape(w, 8, 4).amax(2, keepdim=True).expand(w, 8, 4)
                    new_max = torch.maximum(row_max[h], tile_max.reshape(w, 32))
                    safe_max = torch.where(new_max == -math.inf, 0.0, new_max)
                    alpha[h] = torch.exp2(row_max[h] - safe_max)
                    row_max[h] = new_max
                    row_sum[h] *= alpha[h]
                for e in range(4):
                    safe = torch.where(row_max[e // 2] == -math.inf, 0.0, row_max[e // 2])
                    s_acc[..., e] = torch.exp2(s_acc[..., e] - safe)
                    row_sum[e // 2] += s_acc[..., e].sum(0)
                o_acc[..., 0:2] *= alpha[0][..., None]
                o_acc[..., 2:4] *= alpha[1][..., None]
                for kk in range(4):
                    p_frag = rnd(torch.stack([s_acc[2 * kk][..., 0:2], s_acc[2 * kk][..., 2:4],
                                              s_acc[2 * kk + 1][..., 0:2],
                                              s_acc[2 * kk + 1][..., 2:4]], 2))
                    for n in range(0, dim // 8, 2):
                        b = ptx_ldmatrix_x4(v_tile, kk * 16 + v_row, n * 8 + v_col, trans=True)
                        ptx_mma(o_acc[n], p_frag, b[:, :, 0:2])
                        ptx_mma(o_acc[n + 1], p_frag, b[:, :, 2:4])
            for h in range(2):
                total = row_sum[h].reshape(w, 8, 4).sum(2, keepdim=True).expand(w, 8, 4)
                inverse = torch.where(total > 0, 1.0 / total, 0.0).reshape(w, 32)
                local = row0 + 8 * h
                row = table_rows(q_start + m_first, q_count, q_rows, q.shape[0])[local]
                keep = row >= 0  # local < q_count and a valid table entry
                values = rnd(o_acc[..., 2 * h:2 * h + 2] * inverse[..., None])  # (D/8, W, 32, 2)
                values = values.permute(1, 2, 0, 3)[keep]  # (kept, D/8, 2)
                cols = (torch.arange(dim // 8)[:, None] * 8 + torch.arange(2)) \
                    + PAIR.expand(w, 32)[keep][:, None, None]
                out[row[keep][:, None, None], head_of.expand(w, 32)[keep][:, None, None], cols] = values
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case,head_dim", [("sorted_active", 64), ("sorted_all", 64), ("plain", 64),
                                           ("clipped", 64), ("seqused", 64), ("sorted_active", 32),
                                           ("plain", 128)])
def test_emulated_varlen_attention_matches_eager(dtype, case, head_dim):
    """The kernel's fragments (ldmatrix, ldmatrix.trans, mma), masking and online softmax give the
    op's result (error vs fp64 at most 2x the eager op's in ``dtype`` + floor) for head_dim 32, 64
    and 128; segments of 1, 64, 65 and >128 rows, empty ones, index tables, and a static bound below
    the longest segment (positions past it are ignored); used lengths over one table with static
    segment starts (``seqused``, as the sync-free path calls it) equal the step's own tables."""
    torch.manual_seed(1)
    heads, q_rows, kv_rows, max_len = 2, None, None, 150
    if case.startswith("sorted") or case == "seqused":
        depths = profile_depths("cls_deep", 3, 150, 4)
        layout = _depth_sort_eager(depths, 4)
        total = 3 * 150
        cu_q = layout.cu_seqlens[1]
        q_rows = layout.attention_rows(2, total)
        cu_k, kv_rows = ((cu_q, q_rows) if case in ("sorted_active", "seqused")
                         else (layout.all_rows_cu_seqlens(), layout.image_order))
    else:
        lengths = torch.tensor([1, 64, 0, 65, 150])
        total = int(lengths.sum())
        cu_q = cu_k = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        if case == "clipped":
            max_len = 100
    q, k, v = (torch.randn(total, heads, head_dim).to(dtype) for _ in range(3))
    args = (cu_q, cu_k, max_len, max_len, head_dim ** -0.5)
    if case == "seqused":  # the kernel sees static starts b*N and the used lengths
        starts, used = layout.all_rows_cu_seqlens(), layout.image_lengths[1]
        ours = emulate_varlen_attention(q.float(), k.float(), v.float(), starts, starts, *args[2:],
                                        layout.image_order, layout.image_order, dtype, used, used)
    else:
        ours = emulate_varlen_attention(q.float(), k.float(), v.float(), *args, q_rows, kv_rows,
                                        dtype)
    reference = rk.varlen_attention(q.double(), k.double(), v.double(), *args, q_rows=q_rows,
                                    kv_rows=kv_rows, backend="eager")
    theirs = rk.varlen_attention(q, k, v, *args, q_rows=q_rows, kv_rows=kv_rows, backend="eager")
    assert_flash_rule(ours, theirs, reference, FLOOR[dtype])
    assert torch.equal((ours == 0).all(-1), (reference == 0).all(-1))  # same rows left zero


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kv", ["active", "all"])
def test_emulated_varlen_attention_keeps_a_nan_in_its_segment(kv):
    """The kernel's zero-filled tiles: a NaN row of image 0 leaves the other images' outputs as they
    were (as the model calls it: one ``image_order`` table, static starts, used lengths)."""
    torch.manual_seed(2)
    layout = _depth_sort_eager(profile_depths("cls_deep", 3, 70, 4), 4)
    starts, used = layout.all_rows_cu_seqlens(), layout.image_lengths[1]
    q, k, v = (torch.randn(210, 2, 64).half().float() for _ in range(3))
    args = (starts, starts, 70, 70, 0.125, layout.image_order, layout.image_order, torch.float16, used,
            used if kv == "active" else None)
    clean = emulate_varlen_attention(q, k, v, *args)
    for x in (q, k, v):
        x[layout.image_order[0]] = float("nan")
    ours = emulate_varlen_attention(q, k, v, *args)
    others = layout.image_order[70:]
    assert torch.isnan(ours[layout.image_order[0]]).all()
    assert torch.equal(ours[others], clean[others])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("queries,keys", [(0, 5), (4, 0), (0, 0)])
def test_emulated_varlen_attention_without_query_or_key_rows(queries, keys):
    """No query rows: every block returns (an empty output); no key rows: the blocks write zeros
    (row sum 0): the op's result, which eager raised an IndexError for."""
    q = torch.randn(queries, 2, 32).half().float()
    k, v = (torch.randn(keys, 2, 32).half().float() for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, rows // 2, rows], dtype=torch.int32) for rows in (queries, keys))
    args = (cu_q, cu_k, 4, 4, 32 ** -0.5)
    ours = emulate_varlen_attention(q, k, v, *args)
    assert torch.equal(ours, rk.varlen_attention(q, k, v, *args, backend="eager"))
    assert ours.shape == q.shape and not ours.any()


def c_fragment(d):
    """The 16x8 matrix held in mma C/D fragments d (W, 32, 4): c_i at row group (+8 for i >= 2),
    column pair + (i & 1)."""
    matrix = torch.zeros(d.shape[0], 16, 8)
    for reg in range(4):
        matrix[:, GROUP + 8 * (reg // 2), PAIR + reg % 2] = d[:, :, reg]
    return matrix


@pytest.mark.usefixtures("one_thread")
def test_emulated_ldmatrix_gives_the_mma_operands():
    """The lane addresses the kernels give ldmatrix load the operands of the PTX ISA's
    mma.m16n8k16 layout: A from a row-major tile, B from the rows of W (B = W^T) with the plain
    form, B from a row-major V tile with .trans; each x4 load feeds two n8 tiles."""
    torch.manual_seed(2)
    x, weight, values = torch.randn(1, 48, 40), torch.randn(1, 24, 40), torch.randn(1, 40, 32)
    lane = LANE[None]
    r0, n0, c0 = 16, 8, 16
    a = ptx_ldmatrix_x4(x, r0 + lane % 16, c0 + (lane // 16) * 8)
    b = ptx_ldmatrix_x4(weight, n0 + (lane // 16) * 8 + lane % 8, c0 + ((lane // 8) % 2) * 8)
    v = ptx_ldmatrix_x4(values, c0 + ((lane // 8) % 2) * 8 + lane % 8, n0 + (lane // 16) * 8,
                        trans=True)
    block = x[0, r0:r0 + 16, c0:c0 + 16]
    for tile in range(2):
        d = torch.zeros(1, 32, 4)
        ptx_mma(d, a, b[:, :, 2 * tile:2 * tile + 2])
        rows = weight[0, n0 + 8 * tile:n0 + 8 * tile + 8, c0:c0 + 16]
        torch.testing.assert_close(c_fragment(d)[0], block @ rows.T)
        d = torch.zeros(1, 32, 4)
        ptx_mma(d, a, v[:, :, 2 * tile:2 * tile + 2])
        columns = values[0, c0:c0 + 16, n0 + 8 * tile:n0 + 8 * tile + 8]
        torch.testing.assert_close(c_fragment(d)[0], block @ columns)


def emulate_prefix_linear(x, weight, bias, num_rows, gelu, residual, dtype):
    """csrc/prefix_linear.cu, block by block (its 4 warps batched); float32 tensors holding
    ``dtype`` values. The 3-stage cp.async pipeline only reorders copies, so each K step's tiles
    are loaded when they are used. The result starts as NaN: rows the kernel does not store stay
    NaN."""
    rows, k_dim = x.shape
    n_out = weight.shape[0]
    live = min(max(num_rows, 0), rows)
    out = torch.full((rows, n_out), math.nan)
    warp = torch.arange(4)[:, None]
    warp_m, warp_n = (warp // 2) * 64, (warp % 2) * 32
    lane = LANE.expand(4, 32)
    a_row, a_col = warp_m + lane % 16, (lane // 16) * 8
    b_row, b_col = warp_n + (lane // 16) * 8 + lane % 8, ((lane // 8) % 2) * 8

    def load(matrix, first, count_limit, k0, size):  # zero fill past the limit rows and past K
        tile = torch.zeros(size, 32)
        r = torch.arange(first, min(first + size, count_limit))
        c = torch.arange(k0, min(k0 + 32, k_dim))
        tile[r[:, None] - first, c - k0] = matrix[r[:, None], c]
        return tile.expand(4, size, 32)

    for m0 in range(0, rows, 128):
        for n0 in range(0, n_out, 64):
            if m0 >= live:
                continue  # the block returns
            k_steps = (k_dim + 31) // 32
            acc = torch.zeros(4, 4, 4, 32, 4)  # [i][j]: (W, 32, 4)
            for k_step in range(k_steps):
                a_tile = load(x, m0, live, k_step * 32, 128)
                b_tile = load(weight, n0, n_out, k_step * 32, 64)
                for kk in range(2):
                    a = torch.stack([ptx_ldmatrix_x4(a_tile, a_row + i * 16, kk * 16 + a_col)
                                     for i in range(4)])  # (i, W, 32, 4, 2)
                    b = torch.cat([ptx_ldmatrix_x4(b_tile, b_row + j * 8, kk * 16 + b_col)
                                   .reshape(4, 32, 2, 2, 2).transpose(0, 2).transpose(1, 2)
                                   for j in (0, 2)])  # (j, W, 32, 2, 2): x4 -> n8 tiles j, j + 1
                    ptx_mma(acc.view(-1, 32, 4), a[:, None].expand(4, 4, 4, 32, 4, 2).reshape(-1, 32, 4, 2),
                            b[None].expand(4, 4, 4, 32, 2, 2).reshape(-1, 32, 2, 2))
            for j in range(4):
                for i in range(4):
                    for h in range(2):
                        row = m0 + warp_m + i * 16 + GROUP + 8 * h  # (4, 32)
                        for e in range(2):
                            col = n0 + warp_n + j * 8 + PAIR + e
                            stored = (row < live) & (col < n_out)
                            r, c = row[stored], col[stored]
                            value = acc[i, j][..., 2 * h + e][stored]
                            if bias is not None:
                                value = value + bias[c]
                            if gelu:
                                value = torch.nn.functional.gelu(value)
                            if residual is not None:
                                value = value + residual[r, c]
                            out[r, c] = value.to(dtype).float()
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("live,epilogue", [(0, "gelu"), (1, "residual"), (100, "gelu"), (128, "none"),
                                           (150, "residual"), (10**6, "all"), (-3, "gelu")])
def test_emulated_prefix_linear_matches_eager(dtype, live, epilogue):
    """The GEMM kernel's fragments and epilogue give the op's result on the live rows and store
    nothing past them: live counts of none, one, part of a row block, a whole block, all rows, past
    the rows and negative; 2 row blocks, a partial column block (n = 72), a partial K step (K = 40);
    bias + GELU, bias + residual, both, neither."""
    rows, k_dim, n_out = 150, 40, 72
    x = torch.randn(rows, k_dim).to(dtype)
    weight = (torch.randn(n_out, k_dim) / k_dim ** 0.5).to(dtype)
    bias = None if epilogue == "none" else torch.randn(n_out).to(dtype)
    residual = torch.randn(rows, n_out).to(dtype) if epilogue in ("residual", "all") else None
    activation = "gelu" if epilogue in ("gelu", "all") else None
    as_float = lambda t: None if t is None else t.float()  # noqa: E731
    as_double = lambda t: None if t is None else t.double()  # noqa: E731
    num_rows = torch.tensor([live])
    ours = emulate_prefix_linear(x.float(), weight.float(), as_float(bias), live,
                                 activation == "gelu", as_float(residual), dtype)
    reference = rk.prefix_linear(x.double(), weight.double(), as_double(bias), num_rows, activation,
                                 as_double(residual), backend="eager")
    theirs = rk.prefix_linear(x, weight, bias, num_rows, activation, residual, backend="eager")
    stored = min(max(live, 0), rows)
    assert not ours[:stored].isnan().any() and ours[stored:].isnan().all()
    if stored:
        assert_flash_rule(ours[:stored], theirs[:stored], reference[:stored], FLOOR[dtype])


def gemm_schedule(k_steps, stages=3):
    """csrc/prefix_linear.cu's main loop as a sequence of cp.async / barrier / compute events."""
    events = []
    for stage in range(stages - 1):
        if stage < k_steps:
            events.append(("load", stage, stage))
        events.append(("commit",))
    for k_step in range(k_steps):
        events += [("wait", stages - 2), ("barrier",)]
        if k_step + stages - 1 < k_steps:
            events.append(("load", (k_step + stages - 1) % stages, k_step + stages - 1))
        events.append(("commit",))
        events.append(("compute", k_step % stages, k_step))
    return events


def attention_schedule(n_tiles):
    """csrc/varlen_attention.cu's key loop: K/V tile t+1 copied into the other buffer while tile t
    is computed."""
    events = [("load", 0, 0)] if n_tiles > 0 else []
    events.append(("commit",))
    for tile in range(n_tiles):
        events += [("wait", 0), ("barrier",)]
        if tile + 1 < n_tiles:
            events += [("load", (tile + 1) % 2, tile + 1), ("commit",)]
        events.append(("compute", tile % 2, tile))
    return events


def check_schedule(events, steps):
    """cp.async semantics (PTX ISA): a thread's copies complete, group by group, at
    cp.async.wait_group n (all but its newest n committed groups); other threads see them after
    the next barrier. Every compute must read its own step's data, landed and published, and no
    copy may overwrite a buffer that a warp may still be computing on (i.e. whose compute was not
    followed by a barrier)."""
    pending, groups, done = [], [], set()  # loads not yet committed; committed groups; landed
    buffer = {}  # stage -> [step, landed, published, computed, computed before the last barrier]
    for event in events:
        kind = event[0]
        if kind == "load":
            _, stage, step = event
            old = buffer.get(stage)
            assert old is None or old[4], f"step {step} overwrites stage {stage} before a barrier"
            buffer[stage] = [step, False, False, False, False]
            pending.append(step)
        elif kind == "commit":
            groups.append(pending)
            pending = []
        elif kind == "wait":
            complete = groups if event[1] == 0 else groups[:-event[1]]
            for group in complete:
                done.update(group)
        elif kind == "barrier":
            for state in buffer.values():
                state[1] = state[0] in done
                state[2] = state[2] or state[1]
                state[4] = state[3]
        else:
            _, stage, step = event
            state = buffer[stage]
            assert state[0] == step and state[2], f"step {step} reads stage {stage}: {state}"
            state[3] = True
    computed = [event[2] for event in events if event[0] == "compute"]
    assert computed == list(range(steps))


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4, 7, 24])
def test_pipelines_read_landed_data_and_never_overwrite_live_buffers(steps):
    """The cp.async pipelines' stage arithmetic and wait counts (3 stages in the GEMM's K loop,
    2 K/V buffers in attention), checked as event sequences for 0 to 24 steps."""
    check_schedule(gemm_schedule(steps), steps)
    check_schedule(attention_schedule(steps), steps)
    with pytest.raises(AssertionError):  # the check can fail: a wait that leaves 2 groups open
        check_schedule([e if e[0] != "wait" else ("wait", 2) for e in gemm_schedule(4)], 4)
    with pytest.raises(AssertionError):  # or a load into the buffer being computed on
        check_schedule([e if e[0] != "load" else ("load", 0, e[2]) for e in attention_schedule(3)], 3)


# ---------------------------------------------------------------- GPU: kernels vs eager

@pytest.fixture(scope="module")
def ext():
    reason = rk.unavailable_reason("cuda")
    assert reason is None, f"the cuda backend did not load on this GPU machine: {reason}"
    from recvit_kernels.cuda import extension
    return extension()


@contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def assert_layouts_equal(ours, reference):
    for field in ("perm", "inverse_perm", "step_rows", "image_lengths", "cu_seqlens",
                  "image_order"):
        a, b = getattr(ours, field), getattr(reference, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        assert torch.equal(a, b), field
    assert (ours.batch, ours.tokens, ours.num_steps) == (reference.batch, reference.tokens,
                                                         reference.num_steps)


@pytest.mark.gpu
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("batch,tokens,num_steps", [(1, 197, 12), (8, 197, 12), (4, 577, 12),
                                                   (3, 50, 5), (64, 197, 12), (2, 1000, 1),
                                                   (2, 7, 40)])
def test_depth_sort_equals_argsort_reference(ext, profile, batch, tokens, num_steps):
    depths = profile_depths(profile, batch, tokens, num_steps, "cuda")
    with no_host_sync():
        layout = rk.depth_sort(depths, num_steps, backend="cuda")
    assert_layouts_equal(layout, _depth_sort_eager(depths, num_steps))


@pytest.mark.gpu
def test_depth_sort_input_forms(ext):
    depths = profile_depths("random", 5, 197, 12, "cuda")
    reference = _depth_sort_eager(depths, 12)
    for form in (depths.int(), depths.to(torch.uint8), depths.t().contiguous().t()):
        assert_layouts_equal(rk.depth_sort(form, 12, backend="cuda"), reference)


def attention_inputs(profile, batch, tokens, num_steps, heads, dtype, kv, head_dim=64):
    """q, k, v rows in the sorted layout and, per step, the call's index tables and cu_seqlens."""
    depths = profile_depths(profile, batch, tokens, num_steps, "cuda")
    layout = rk.depth_sort(depths, num_steps, backend="cuda")
    total = batch * tokens
    q, k, v = (torch.randn(total, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    for step in sorted({1, (num_steps + 1) // 2, num_steps}):
        rows = layout.attention_rows(step, total)
        cu_q = layout.cu_seqlens[step - 1]
        if kv == "active":
            kv_rows, cu_k = rows, cu_q
        else:
            kv_rows, cu_k = layout.image_order, layout.all_rows_cu_seqlens()
        active = int(layout.step_rows[step - 1])
        yield q, k, v, cu_q, cu_k, rows, kv_rows, rows[:active], tokens


def attention(q, k, v, cu_q, cu_k, max_q, max_k, q_rows, kv_rows, backend):
    return rk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, q.shape[-1] ** -0.5,
                               q_rows=q_rows, kv_rows=kv_rows, backend=backend)


def check_attention(q, k, v, cu_q, cu_k, max_q, max_k, q_rows=None, kv_rows=None):
    """Error vs an fp64 reference <= 2x the eager op's error in the same dtype + floor."""
    args = (cu_q, cu_k, max_q, max_k, q_rows, kv_rows)
    with no_host_sync():
        ours = attention(q, k, v, *args, backend="cuda")
    reference = attention(q.double(), k.double(), v.double(), *args, backend="eager")
    theirs = attention(q, k, v, *args, backend="eager")
    assert ours.shape == q.shape and ours.dtype == q.dtype
    assert_flash_rule(ours, theirs, reference, FLOOR[q.dtype])
    return ours


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("batch,tokens,heads", [(1, 197, 3), (8, 197, 6), (2, 577, 12), (3, 50, 2)])
def test_varlen_attention_matches_eager(ext, dtype, kv, profile, batch, tokens, heads):
    for q, k, v, cu_q, cu_k, rows, kv_rows, active_rows, max_len in attention_inputs(
            profile, batch, tokens, 12, heads, dtype, kv):
        out = check_attention(q, k, v, cu_q, cu_k, max_len, max_len, rows, kv_rows)
        covered = torch.zeros(q.shape[0], dtype=torch.bool, device="cuda")
        covered[active_rows] = True
        assert torch.all(out[~covered] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("head_dim", [32, 128])
def test_varlen_attention_other_head_dims(ext, dtype, kv, head_dim):
    for q, k, v, cu_q, cu_k, rows, kv_rows, active_rows, max_len in attention_inputs(
            "cls_deep", 4, 197, 12, 3, dtype, kv, head_dim):
        check_attention(q, k, v, cu_q, cu_k, max_len, max_len, rows, kv_rows)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_varlen_attention_used_lengths(ext, dtype, head_dim):
    """seqused_q/k over one table with static segment starts (the sync-free path's call) gives the
    step's rows exactly as the step's own tables do."""
    batch, tokens, steps = 8, 197, 12
    depths = profile_depths("cls_deep", batch, tokens, steps, "cuda")
    layout = rk.depth_sort(depths, steps, backend="cuda")
    total = batch * tokens
    q, k, v = (torch.randn(total, 3, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    starts = layout.all_rows_cu_seqlens()
    for step in (1, 6, 12):
        used = layout.image_lengths[step - 1]
        with no_host_sync():
            ours = ext.varlen_attention_forward(q, k, v, starts, starts, tokens, tokens,
                                                head_dim ** -0.5, layout.image_order,
                                                layout.image_order, used, used)
        rows = layout.attention_rows(step, total)
        cu = layout.cu_seqlens[step - 1]
        expected = check_attention(q, k, v, cu, cu, tokens, tokens, rows, rows)
        active = rows[:int(layout.step_rows[step - 1])]
        assert torch.equal(ours[active], expected[active])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_varlen_attention_plain_segments_and_strided_input(ext, dtype, head_dim):
    lengths = torch.tensor([197, 1, 64, 65, 130, 0, 577])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    total, heads = int(lengths.sum()), 6
    qkv = torch.randn(total, 3, heads, head_dim, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(1)  # row stride 3*H*D: not contiguous
    check_attention(q, k, v, cu, cu, 577, 577)
    # a static bound larger than every segment changes nothing
    check_attention(q, k, v, cu, cu, 1024, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,weight_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rows,width", [(8 * 197, 192), (1000, 384), (77, 768), (5, 100), (3, 1024),
                                        (0, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_eager(ext, dtype, weight_dtype, rows, width, with_residual):
    """Weight and bias in x's dtype (fp32, fp16, bf16) or in fp32, read as they are, against eager
    under the tolerance rule (fp64 reference), without a host sync."""
    x = torch.randn(rows, width, device="cuda", dtype=dtype) * 3 + 1
    weight = torch.randn(width, device="cuda", dtype=weight_dtype)
    bias = torch.randn(width, device="cuda", dtype=weight_dtype)
    residual = torch.randn_like(x) if with_residual else None
    with no_host_sync():
        ours = rk.layer_norm(x, weight, bias, 1e-6, residual, backend="cuda")
    if weight_dtype == dtype:
        theirs = rk.layer_norm(x, weight, bias, 1e-6, residual, backend="eager")
    else:  # fp32 weights on half-precision x: eager in fp32, rounded once (as autocast runs it)
        summed = x if residual is None else x + residual
        theirs = torch.nn.functional.layer_norm(summed.float(), (width,), weight, bias, 1e-6).to(dtype)
        theirs = theirs if residual is None else (theirs, summed)
    if with_residual:
        (ours, ours_sum), (theirs, theirs_sum) = ours, theirs
        assert torch.equal(ours_sum, theirs_sum)
        summed = theirs_sum.double()
    else:
        summed = x.double()
    reference = torch.nn.functional.layer_norm(summed, (width,), weight.double(), bias.double(),
                                               1e-6)
    assert ours.shape == x.shape and ours.dtype == dtype
    if rows:
        assert_flash_rule(ours, theirs, reference, FLOOR[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(8 * 197, 192), (77, 768), (5, 100), (3, 1024)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_live_rows(ext, dtype, rows, width, with_residual):
    """With num_rows (int32 or int64, read on the device) the rows below it are normalised as by
    eager and nothing is written past it (NaN-filled outputs keep their NaNs there); a count
    below 0 or past the rows is clamped. Through the glue the same live rows."""
    x = torch.randn(rows, width, device="cuda", dtype=dtype) * 3 + 1
    weight = torch.randn(width, device="cuda", dtype=dtype)
    bias = torch.randn(width, device="cuda", dtype=dtype)
    residual = torch.randn_like(x) if with_residual else None
    theirs = rk.layer_norm(x, weight, bias, 1e-6, residual, backend="eager")
    theirs, theirs_sum = theirs if with_residual else (theirs, None)
    reference = torch.nn.functional.layer_norm((x if residual is None else theirs_sum).double(),
                                               (width,), weight.double(), bias.double(), 1e-6)
    for live in sorted({-3, 0, 1, rows // 3, rows - 1, rows, rows + 50}):
        for count_dtype in (torch.int32, torch.int64):
            count = torch.tensor([live], device="cuda", dtype=count_dtype)
            out = torch.full_like(x, math.nan)
            summed = torch.full_like(x, math.nan) if with_residual else None
            with no_host_sync():
                result = ext.layer_norm(x, weight, bias, 1e-6, residual, count, out, summed)
                glued = rk.layer_norm(x, weight, bias, 1e-6, residual, num_rows=count, backend="cuda")
            assert result[0].data_ptr() == out.data_ptr()
            assert (result[1].data_ptr() == summed.data_ptr()) if with_residual else result[1] is None
            glued = glued[0] if with_residual else glued
            m = min(max(live, 0), rows)
            assert out[m:].isnan().all(), (live, count_dtype)
            assert torch.equal(glued[:m], out[:m])
            if with_residual:
                assert summed[m:].isnan().all() and torch.equal(summed[:m], theirs_sum[:m])
            if m:
                assert_flash_rule(out[:m], theirs[:m], reference[:m], FLOOR[dtype])


@pytest.mark.gpu
def test_layer_norm_without_bias_and_3d(ext):
    x = torch.randn(4, 197, 384, device="cuda", dtype=torch.float16)
    weight = torch.rand(384, device="cuda", dtype=torch.float32)
    ours = rk.layer_norm(x, weight, None, 1e-5, backend="cuda")
    reference = torch.nn.functional.layer_norm(x.double(), (384,), weight.double(), None, 1e-5)
    assert ours.shape == x.shape
    assert (ours.double() - reference).abs().max().item() < 1e-2


def optional(tensor, convert):
    return None if tensor is None else convert(tensor)


def linear_operands(rows, k_dim, n_out, dtype, epilogue):
    """x, weight, bias, residual, activation of a prefix_linear call with the named epilogue."""
    x = torch.randn(rows, k_dim, device="cuda", dtype=dtype)
    weight = (torch.randn(n_out, k_dim, device="cuda") / k_dim ** 0.5).to(dtype)
    bias = None if epilogue == "none" else torch.randn(n_out, device="cuda", dtype=dtype)
    residual = (torch.randn(rows, n_out, device="cuda", dtype=dtype)
                if epilogue in ("residual", "all") else None)
    return x, weight, bias, residual, "gelu" if epilogue in ("gelu", "all") else None


def check_prefix_linear(ext, x, weight, bias, num_rows, activation, residual):
    """The cuda prefix_linear, without a host sync, equals eager on the live rows under the
    tolerance rule (fp64 reference); written into ``out`` it gives the same rows and leaves the
    others untouched. Returns the live rows."""
    with no_host_sync():
        ours = rk.prefix_linear(x, weight, bias, num_rows, activation, residual, backend="cuda")
        sentinel = torch.full_like(ours, math.nan)
        into = ext.prefix_linear(x, weight, bias, num_rows, activation == "gelu", residual, sentinel)
    assert into.data_ptr() == sentinel.data_ptr()
    theirs = rk.prefix_linear(x, weight, bias, num_rows, activation, residual, backend="eager")
    reference = rk.prefix_linear(x.double(), weight.double(), optional(bias, torch.Tensor.double),
                                 num_rows, activation, optional(residual, torch.Tensor.double),
                                 backend="eager")
    assert ours.shape == (x.shape[0], weight.shape[0]) and ours.dtype == x.dtype
    live = min(max(int(num_rows), 0), x.shape[0])
    assert torch.equal(sentinel[:live], ours[:live]) and sentinel[live:].isnan().all()
    if live and ours.shape[1]:
        assert_flash_rule(ours[:live], theirs[:live], reference[:live], FLOOR[x.dtype])
    return ours[:live]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,k_dim,n_out", [(8 * 197, 192, 576), (197, 384, 1536), (77, 768, 768),
                                              (64 * 197, 768, 3072), (300, 64, 99), (5, 16, 8),
                                              (0, 64, 64)])
@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual", "all"])
def test_prefix_linear_matches_eager(ext, dtype, rows, k_dim, n_out, epilogue):
    """Live counts of none, one, a third, one row block, all rows and past the rows; Tiny/Small/
    Base GEMM shapes, an odd out_features (unpaired stores), a K below one K step."""
    x, weight, bias, residual, activation = linear_operands(rows, k_dim, n_out, dtype, epilogue)
    for live in sorted({0, 1, rows // 3, 128, rows, rows + 50}):
        num_rows = torch.tensor([live], device="cuda")
        check_prefix_linear(ext, x, weight, bias, num_rows, activation, residual)


@pytest.mark.gpu
def test_prefix_linear_input_forms(ext):
    """A strided x (used in place), a misaligned one (copied), a strided residual, int32 and int64
    counts, and the residual itself as ``out`` (the sync-free path's fc2): the same live rows."""
    wide = torch.randn(300, 3 * 256, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(128, 256, device="cuda") / 16).to(torch.bfloat16)
    bias = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)[:, 64:192]
    counts = (torch.tensor([123], device="cuda", dtype=torch.int32), torch.tensor([123], device="cuda"))
    for x in (wide[:, 256:512], wide[:, 1:257]):
        expected = check_prefix_linear(ext, x.contiguous(), weight, bias, counts[1], "gelu", residual)
        for count in counts:
            assert torch.equal(check_prefix_linear(ext, x, weight, bias, count, "gelu", residual),
                               expected)
    stream = torch.randn(300, 128, device="cuda", dtype=torch.bfloat16)
    old = stream.clone()
    expected = check_prefix_linear(ext, wide[:, :256], weight, bias, counts[0], None, stream)
    ext.prefix_linear(wide[:, :256], weight, bias, counts[0], False, stream, stream)
    assert torch.equal(stream[:123], expected) and torch.equal(stream[123:], old[123:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(8 * 197, 192), (77, 768), (5, 100), (0, 64)])
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (True, False), (False, False)])
def test_mlp_matches_eager(ext, dtype, rows, dim, with_bias, with_residual):
    """cuBLAS + the fused epilogue kernel (vectorised when the width allows, scalar for width 100
    in half precision) equals eager under the tolerance rule, without a host sync."""
    hidden = 4 * dim
    x = torch.randn(rows, dim, device="cuda", dtype=dtype)
    fc1_weight = (torch.randn(hidden, dim, device="cuda") / dim ** 0.5).to(dtype)
    fc2_weight = (torch.randn(dim, hidden, device="cuda") / hidden ** 0.5).to(dtype)
    fc1_bias = torch.randn(hidden, device="cuda", dtype=dtype) if with_bias else None
    fc2_bias = torch.randn(dim, device="cuda", dtype=dtype) if with_bias else None
    residual = torch.randn(rows, dim, device="cuda", dtype=dtype) if with_residual else None
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    with no_host_sync():
        ours = rk.mlp(*args, backend="cuda")
    theirs = rk.mlp(*args, backend="eager")
    reference = rk.mlp(*(optional(t, torch.Tensor.double) for t in args), backend="eager")
    assert ours.shape == (rows, dim) and ours.dtype == dtype
    if rows:
        assert_flash_rule(ours, theirs, reference, FLOOR[dtype])
    if with_residual:  # into the residual itself, and into a strided out: the same values
        stream = residual.clone()
        ext.mlp(*args[:5], stream, stream)
        wide = torch.zeros(rows, 2 * dim, device="cuda", dtype=dtype)
        ext.mlp(*args, wide[:, :dim])
        assert torch.equal(stream, ours) and torch.equal(wide[:, :dim], ours)
        assert torch.all(wide[:, dim:] == 0)


@pytest.mark.gpu
def test_bad_input_raises_naming_the_argument(ext):
    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, 10], dtype=torch.int32, device="cuda")
    x = torch.randn(5, 16, device="cuda", dtype=torch.float16)
    w = torch.randn(24, 16, device="cuda", dtype=torch.float16)
    w2 = torch.randn(16, 24, device="cuda", dtype=torch.float16)
    count = torch.tensor([3], device="cuda")
    ones = torch.ones(64, device="cuda")
    strided = torch.empty(2, 10, 64, device="cuda", dtype=torch.float16).transpose(0, 1)
    dest = torch.empty_like(q)
    shifted = torch.randn(6, 24, device="cuda", dtype=torch.float16)
    wide = torch.randn(5, 24, device="cuda", dtype=torch.float16)
    cases = [
        ("q", lambda: ext.varlen_attention_forward(q.float(), q, q, cu, cu, 10, 10, 0.1)),
        ("q", lambda: ext.varlen_attention_forward(q.cpu(), q, q, cu, cu, 10, 10, 0.1)),
        ("head_dim", lambda: ext.varlen_attention_forward(q[..., :48], q[..., :48], q[..., :48],
                                                          cu, cu, 10, 10, 0.1)),
        ("k", lambda: ext.varlen_attention_forward(q, q.cpu(), q, cu, cu, 10, 10, 0.1)),
        ("v", lambda: ext.varlen_attention_forward(q, q, q[:, :1], cu, cu, 10, 10, 0.1)),
        ("cu_seqlens_q", lambda: ext.varlen_attention_forward(q, q, q, cu.long(), cu, 10, 10, 0.1)),
        ("cu_seqlens_k", lambda: ext.varlen_attention_forward(q, q, q, cu, cu[:1], 10, 10, 0.1)),
        ("max_seqlen_q", lambda: ext.varlen_attention_forward(q, q, q, cu, cu, 0, 10, 0.1)),
        ("q_rows", lambda: ext.varlen_attention_forward(q, q, q, cu, cu, 10, 10, 0.1,
                                                        cu.float(), None)),
        ("seqused_q", lambda: ext.varlen_attention_forward(q, q, q, cu, cu, 10, 10, 0.1, None,
                                                           None, cu, None)),
        ("seqused_k", lambda: ext.varlen_attention_forward(q, q, q, cu, cu, 10, 10, 0.1, None,
                                                           None, None, cu[1:].long())),
        ("depths", lambda: ext.depth_sort(torch.ones(2, 3, device="cuda"), 4)),
        ("depths", lambda: ext.depth_sort(torch.ones(6, device="cuda", dtype=torch.long), 4)),
        ("num_steps", lambda: ext.depth_sort(torch.ones(2, 3, device="cuda", dtype=torch.long), 0)),
        ("weight", lambda: ext.layer_norm(q, torch.ones(63, device="cuda"), None, 1e-6, None)),
        ("residual", lambda: ext.layer_norm(q, torch.ones(64, device="cuda"), None, 1e-6, q[:1])),
        ("x", lambda: ext.layer_norm(q.int(), torch.ones(64, device="cuda"), None, 1e-6, None)),
        ("weight", lambda: ext.layer_norm(q, ones.bfloat16(), None, 1e-6, None)),
        ("bias", lambda: ext.layer_norm(q, ones, ones.half(), 1e-6, None)),
        ("num_rows", lambda: ext.layer_norm(q, ones, None, 1e-6, None, count.repeat(2))),
        ("num_rows", lambda: ext.layer_norm(q, ones, None, 1e-6, None, count.float())),
        ("num_rows", lambda: ext.layer_norm(q, ones, None, 1e-6, None, count.cpu())),
        ("out", lambda: ext.layer_norm(q, ones, None, 1e-6, None, count, q[:1])),
        ("out", lambda: ext.layer_norm(q, ones, None, 1e-6, None, count, q.float())),
        ("out", lambda: ext.layer_norm(q, ones, None, 1e-6, None, count, strided)),
        ("summed", lambda: ext.layer_norm(q, ones, None, 1e-6, None, count, None, q.clone())),
        ("summed", lambda: ext.layer_norm(q, ones, None, 1e-6, q, count, dest, dest)),
        ("x", lambda: ext.prefix_linear(x.float(), w.float(), None, count, False, None)),
        ("x", lambda: ext.prefix_linear(x[:, :12], w[:, :12], None, count, False, None)),
        ("weight", lambda: ext.prefix_linear(x, w[:, :8], None, count, False, None)),
        ("weight", lambda: ext.prefix_linear(x, w.float(), None, count, False, None)),
        ("bias", lambda: ext.prefix_linear(x, w, w[0, :3], count, False, None)),
        ("num_rows", lambda: ext.prefix_linear(x, w, None, count.repeat(2), False, None)),
        ("num_rows", lambda: ext.prefix_linear(x, w, None, count.float(), False, None)),
        ("num_rows", lambda: ext.prefix_linear(x, w, None, count.cpu(), False, None)),
        ("residual", lambda: ext.prefix_linear(x, w, None, count, False, x)),
        ("x", lambda: ext.mlp(x.int(), w, None, w2, None, None)),
        ("fc1_weight", lambda: ext.mlp(x, w.cpu(), None, w2, None, None)),
        ("fc2_weight", lambda: ext.mlp(x, w, None, w, None, None)),
        ("fc1_bias", lambda: ext.mlp(x, w, w[0, :3], w2, None, None)),
        ("fc2_bias", lambda: ext.mlp(x, w, None, w2, x[0, :8], None)),
        ("residual", lambda: ext.mlp(x, w, None, w2, None, w)),
        # an out overlapping what the kernels read (the residual itself is fine), or itself
        ("out", lambda: ext.prefix_linear(x, w, None, count, False, shifted[1:], shifted[:5])),
        ("out", lambda: ext.prefix_linear(wide[:, :16], w, None, count, False, None, wide)),
        ("out", lambda: ext.prefix_linear(x, w, None, count, False, None, shifted[0].expand(5, 24))),
        ("out", lambda: ext.mlp(x, w, None, w2, None, shifted[1:, :16], shifted[:5, :16])),
        ("out", lambda: ext.mlp(x, w, None, w2, wide[0, :16], None, wide[:, :16])),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"^{name}: "):
            call()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_unsupported_calls_fall_back(ext, caplog, monkeypatch, backend):
    """auto, and cuda named explicitly, hand a call the kernels decline to the next backend."""
    monkeypatch.setattr(_backend, "_logged_fallbacks", set())
    q = torch.randn(10, 2, 80, device="cuda", dtype=torch.half)
    cu = torch.tensor([0, 10], dtype=torch.int32, device="cuda")
    with caplog.at_level(logging.INFO, logger="recvit_kernels"):
        out = rk.varlen_attention(q, q, q, cu, cu, 10, 10, backend=backend)
    assert "falling back from cuda: head_dim=80" in caplog.text
    torch.testing.assert_close(out, rk.varlen_attention(q, q, q, cu, cu, 10, 10, backend="eager"))


@pytest.mark.gpu
def test_bad_tables_and_depths_never_access_out_of_bounds(ext, monkeypatch):
    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.float16)
    bad_rows = torch.tensor([0, -5, 3, 10**9, 9], device="cuda")
    bad_cu = torch.tensor([0, 3, 40], dtype=torch.int32, device="cuda")  # past the 5-entry table
    ext.varlen_attention_forward(q, q, q, bad_cu, bad_cu, 64, 64, 0.1, bad_rows, bad_rows)
    ext.depth_sort(torch.tensor([[0, 5, 99, -3]], device="cuda"), 4)
    torch.cuda.synchronize()  # an illegal access would surface here
    monkeypatch.setenv("RECVIT_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match="^depths: values must lie in 1..4"):
        rk.depth_sort(torch.tensor([[0, 5]], device="cuda"), 4, backend="cuda")


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(ext):
    """Depth sort, attention, LayerNorm, the live-row GEMMs and the MLP captured in one graph;
    replays with new depths equal fresh calls on the live rows, and a replay after an in-place
    change of the (fp16) LayerNorm weight uses the new weight (the kernel reads it, no copy)."""
    batch, tokens, steps = 4, 197, 12
    static_depths = profile_depths("random", batch, tokens, steps, "cuda")
    x = torch.randn(batch * tokens, 3, 64, device="cuda", dtype=torch.float16)
    weight = torch.ones(192, device="cuda", dtype=torch.float16)
    fc1 = (torch.randn(768, 192, device="cuda") / 14).half()
    fc2 = (torch.randn(192, 768, device="cuda") / 28).half()
    bias1, bias2 = torch.randn(768, device="cuda").half(), torch.randn(192, device="cuda").half()

    def forward(depths):
        layout = rk.depth_sort(depths, steps, backend="cuda")
        rows = layout.attention_rows(6, batch * tokens)
        out = rk.varlen_attention(x, x, x, layout.cu_seqlens[5], layout.cu_seqlens[5], tokens,
                                  tokens, q_rows=rows, kv_rows=rows, backend="cuda")
        live = layout.step_rows[5:6]
        normed = rk.layer_norm(out.reshape(-1, 192), weight, None, num_rows=live, backend="cuda")
        hidden = rk.prefix_linear(normed, fc1, bias1, live, "gelu", backend="cuda")
        mixed = rk.prefix_linear(hidden, fc2, bias2, live, residual=normed, backend="cuda")
        return rk.mlp(mixed, fc1, bias1, fc2, bias2, residual=mixed, backend="cuda"), live

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(static_depths)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_live = forward(static_depths)
    for profile in ("random", "all_one", "cls_deep", "new weight"):
        if profile == "new weight":
            weight.copy_(torch.rand_like(weight) + 0.5)
        else:
            static_depths.copy_(profile_depths(profile, batch, tokens, steps, "cuda"))
        graph.replay()
        fresh, live = forward(static_depths)
        assert torch.equal(static_live, live)
        rows = int(live)  # rows past the live count are unspecified (never written)
        torch.testing.assert_close(static_out[:rows], fresh[:rows], rtol=0, atol=0)


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, recvit_kernels as rk
    from recvit_kernels.cuda import extension
    depths = torch.randint(1, 13, (3, 197), device="cuda")
    depths[0] = 1
    layout = rk.depth_sort(depths, 12, backend="cuda")
    q = torch.randn(3 * 197, 2, 64, device="cuda", dtype=torch.bfloat16)
    for step in (1, 6, 12):
        rows = layout.attention_rows(step, 3 * 197)
        cu = layout.cu_seqlens[step - 1]
        rk.varlen_attention(q, q, q, cu, cu, 197, 197, q_rows=rows, kv_rows=rows, backend="cuda")
        rk.varlen_attention(q.half(), q.half(), q.half(), cu, layout.all_rows_cu_seqlens(),
                            197, 197,
                            q_rows=rows, kv_rows=layout.image_order, backend="cuda")
    ext = extension()
    starts = layout.all_rows_cu_seqlens()
    for step in (1, 6, 12):  # used lengths over one table, as the sync-free path calls it
        used = layout.image_lengths[step - 1]
        ext.varlen_attention_forward(q, q, q, starts, starts, 197, 197, 0.125, layout.image_order,
                                     layout.image_order, used, used)
    for head_dim in (32, 128):
        q = torch.randn(3 * 197, 2, head_dim, device="cuda", dtype=torch.float16)
        rows = layout.attention_rows(4, 3 * 197)
        cu = layout.cu_seqlens[3]
        rk.varlen_attention(q, q, q, cu, cu, 197, 197, q_rows=rows, kv_rows=rows, backend="cuda")
    x = torch.randn(100, 384, device="cuda", dtype=torch.float16)
    rk.layer_norm(x, torch.ones(384, device="cuda"), None, 1e-6, x, backend="cuda")
    for live in (-1, 0, 37, 100, 1000):  # fp16 weights, read as they are; rows past live untouched
        count = torch.tensor([live], device="cuda", dtype=torch.int32)
        rk.layer_norm(x, x[0], x[1], 1e-6, x, num_rows=count, backend="cuda")
    w1 = torch.randn(1536, 384, device="cuda", dtype=torch.float16) / 20
    w2 = torch.randn(384, 1536, device="cuda", dtype=torch.float16) / 40
    b1, b2 = w1[:, 0].contiguous(), w2[:, 0].contiguous()
    for live in (0, 37, 100, 1000):
        count = torch.tensor([live], device="cuda")
        h = rk.prefix_linear(x, w1, b1, count, "gelu", backend="cuda")
        rk.prefix_linear(h, w2, b2, count, residual=x, backend="cuda")
    rk.prefix_linear(x[:, :200], w1[:99, :200], None, count, backend="cuda")  # odd n, K tail
    rk.mlp(x, w1, b1, w2, b2, residual=x, backend="cuda")
    rk.mlp(x[:, :100], w1[:, :100], b1, w2[:100], b2[:100], backend="cuda")  # scalar epilogue
    ext.prefix_linear(h, w2, b2, torch.tensor([37], device="cuda"), False, x, x)  # in place
    ext.mlp(x.clone(), w1, b1, w2, b2, x, x)  # in place on the residual (apart from the input)
    torch.cuda.synchronize()
""")


def compute_sanitizer():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = shutil.which("compute-sanitizer") or f"{home}/bin/compute-sanitizer"
    return found if os.access(found, os.X_OK) else None


@pytest.mark.gpu
@pytest.mark.sanitizer
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(ext, tool, tmp_path):
    sanitizer = compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "run_kernels.py"
    script.write_text(SANITIZER_SCRIPT)
    result = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable,
                             str(script)], capture_output=True, text=True, timeout=900,
                            cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    clean = "ERROR SUMMARY: 0 errors" in output or "RACECHECK SUMMARY: 0 hazards" in output
    assert clean, output[-4000:]
