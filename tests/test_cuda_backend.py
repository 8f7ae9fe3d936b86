"""The ``cuda`` backend: availability reporting and fall back (CPU), the pure-Python CPU build, and,
on a GPU (marked gpu), every kernel against the eager reference."""
import logging
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
from recvit_kernels.depth_sort import _depth_sort_eager

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
    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    module, reason = backend._load()
    assert module is None and "nvcc was not found" in reason and "JIT build failed" in reason


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
    for name in ("binding.cpp", "depth_sort.cu", "varlen_attention.cu", "layer_norm.cu",
                 "recvit_kernels.h"):
        assert f"recvit_kernels/cuda/csrc/{name}" in names


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


def attention_inputs(profile, batch, tokens, num_steps, heads, dtype, kv):
    """q, k, v rows in the sorted layout and, per step, the call's index tables and cu_seqlens."""
    depths = profile_depths(profile, batch, tokens, num_steps, "cuda")
    layout = rk.depth_sort(depths, num_steps, backend="cuda")
    total = batch * tokens
    q, k, v = (torch.randn(total, heads, 64, device="cuda", dtype=dtype) for _ in range(3))
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
    error = (ours.double() - reference).abs().max().item()
    baseline = (theirs.double() - reference).abs().max().item()
    assert error <= 2 * baseline + FLOOR[q.dtype], (error, baseline)
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
def test_varlen_attention_plain_segments_and_strided_input(ext, dtype):
    lengths = torch.tensor([197, 1, 64, 65, 130, 0, 577])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    total, heads = int(lengths.sum()), 6
    qkv = torch.randn(total, 3, heads, 64, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(1)  # row stride 3*H*D: not contiguous
    check_attention(q, k, v, cu, cu, 577, 577)
    # a static bound larger than every segment changes nothing
    check_attention(q, k, v, cu, cu, 1024, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(8 * 197, 192), (1000, 384), (77, 768), (5, 100), (3, 1024),
                                        (0, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_eager(ext, dtype, rows, width, with_residual):
    x = torch.randn(rows, width, device="cuda", dtype=dtype) * 3 + 1
    weight = torch.randn(width, device="cuda", dtype=dtype)
    bias = torch.randn(width, device="cuda", dtype=dtype)
    residual = torch.randn_like(x) if with_residual else None
    with no_host_sync():
        ours = rk.layer_norm(x, weight, bias, 1e-6, residual, backend="cuda")
    theirs = rk.layer_norm(x, weight, bias, 1e-6, residual, backend="eager")
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
        error = (ours.double() - reference).abs().max().item()
        baseline = (theirs.double() - reference).abs().max().item()
        assert error <= 2 * baseline + FLOOR[dtype], (error, baseline)


@pytest.mark.gpu
def test_layer_norm_without_bias_and_3d(ext):
    x = torch.randn(4, 197, 384, device="cuda", dtype=torch.float16)
    weight = torch.rand(384, device="cuda", dtype=torch.float32)
    ours = rk.layer_norm(x, weight, None, 1e-5, backend="cuda")
    reference = torch.nn.functional.layer_norm(x.double(), (384,), weight.double(), None, 1e-5)
    assert ours.shape == x.shape
    assert (ours.double() - reference).abs().max().item() < 1e-2


@pytest.mark.gpu
def test_bad_input_raises_naming_the_argument(ext):
    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, 10], dtype=torch.int32, device="cuda")
    cases = [
        ("q", lambda: ext.varlen_attention_forward(q.float(), q, q, cu, cu, 10, 10, 0.1)),
        ("q", lambda: ext.varlen_attention_forward(q.cpu(), q, q, cu, cu, 10, 10, 0.1)),
        ("head_dim", lambda: ext.varlen_attention_forward(q[..., :32], q[..., :32], q[..., :32],
                                                          cu, cu, 10, 10, 0.1)),
        ("k", lambda: ext.varlen_attention_forward(q, q.cpu(), q, cu, cu, 10, 10, 0.1)),
        ("v", lambda: ext.varlen_attention_forward(q, q, q[:, :1], cu, cu, 10, 10, 0.1)),
        ("cu_seqlens_q", lambda: ext.varlen_attention_forward(q, q, q, cu.long(), cu, 10, 10, 0.1)),
        ("cu_seqlens_k", lambda: ext.varlen_attention_forward(q, q, q, cu, cu[:1], 10, 10, 0.1)),
        ("max_seqlen_q", lambda: ext.varlen_attention_forward(q, q, q, cu, cu, 0, 10, 0.1)),
        ("q_rows", lambda: ext.varlen_attention_forward(q, q, q, cu, cu, 10, 10, 0.1,
                                                        cu.float(), None)),
        ("depths", lambda: ext.depth_sort(torch.ones(2, 3, device="cuda"), 4)),
        ("depths", lambda: ext.depth_sort(torch.ones(6, device="cuda", dtype=torch.long), 4)),
        ("num_steps", lambda: ext.depth_sort(torch.ones(2, 3, device="cuda", dtype=torch.long), 0)),
        ("weight", lambda: ext.layer_norm(q, torch.ones(63, device="cuda"), None, 1e-6, None)),
        ("residual", lambda: ext.layer_norm(q, torch.ones(64, device="cuda"), None, 1e-6, q[:1])),
        ("x", lambda: ext.layer_norm(q.int(), torch.ones(64, device="cuda"), None, 1e-6, None)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"^{name}: "):
            call()
    with pytest.raises(RuntimeError, match="head_dim=80"):
        rk.varlen_attention(*(torch.randn(10, 2, 80, device="cuda", dtype=torch.half),) * 3, cu, cu,
                            10, 10, backend="cuda")


@pytest.mark.gpu
def test_auto_falls_back_for_unsupported_calls(ext, caplog, monkeypatch):
    monkeypatch.setattr(_backend, "_logged_fallbacks", set())
    q = torch.randn(10, 2, 80, device="cuda", dtype=torch.half)
    cu = torch.tensor([0, 10], dtype=torch.int32, device="cuda")
    with caplog.at_level(logging.INFO, logger="recvit_kernels"):
        out = rk.varlen_attention(q, q, q, cu, cu, 10, 10, backend="auto")
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
    batch, tokens, steps = 4, 197, 12
    static_depths = profile_depths("random", batch, tokens, steps, "cuda")
    x = torch.randn(batch * tokens, 3, 64, device="cuda", dtype=torch.float16)
    weight = torch.ones(192, device="cuda", dtype=torch.float16)

    def forward(depths):
        layout = rk.depth_sort(depths, steps, backend="cuda")
        rows = layout.attention_rows(6, batch * tokens)
        out = rk.varlen_attention(x, x, x, layout.cu_seqlens[5], layout.cu_seqlens[5], tokens,
                                  tokens, q_rows=rows, kv_rows=rows, backend="cuda")
        return rk.layer_norm(out.reshape(-1, 192), weight, None, backend="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(static_depths)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward(static_depths)
    for profile in ("random", "all_one", "cls_deep"):
        static_depths.copy_(profile_depths(profile, batch, tokens, steps, "cuda"))
        graph.replay()
        torch.testing.assert_close(static_out, forward(static_depths), rtol=0, atol=0)


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, recvit_kernels as rk
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
    x = torch.randn(100, 384, device="cuda", dtype=torch.float16)
    rk.layer_norm(x, torch.ones(384, device="cuda"), None, 1e-6, x, backend="cuda")
    torch.cuda.synchronize()
""")


def compute_sanitizer():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = shutil.which("compute-sanitizer") or f"{home}/bin/compute-sanitizer"
    return found if os.access(found, os.X_OK) else None


@pytest.mark.gpu
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
