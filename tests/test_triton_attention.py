"""Triton varlen attention vs the eager op (flash-attention tolerance rule); GPU tests marked gpu."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import recvit_kernels as rk
from tolerance import assert_flash_rule

pytest.importorskip("triton")
if rk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {rk.unavailable_reason('triton')}", allow_module_level=True)

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def attention(q, k, v, cu_q, cu_k, max_q, max_k, q_rows, kv_rows, backend):
    return rk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, q.shape[-1] ** -0.5,
                               q_rows=q_rows, kv_rows=kv_rows, backend=backend)


def attention_used(q, k, v, starts, used_q, used_k, max_q, max_k, table, backend):
    """The sync-free path's form: one table for every step, static starts, used lengths."""
    return rk.varlen_attention(q, k, v, starts, starts, max_q, max_k, q.shape[-1] ** -0.5, q_rows=table,
                               kv_rows=table, seqused_q=used_q, seqused_k=used_k, backend=backend)


def check_against_reference(q, k, v, *args, form=attention, covered=None):
    """Triton error vs an fp64 reference <= 2x the eager op's error in the same dtype + floor
    (on the ``covered`` rows only, if given)."""
    reference = form(q.double(), k.double(), v.double(), *args, backend="eager")
    ours = form(q, k, v, *args, backend="triton")
    theirs = form(q, k, v, *args, backend="eager")
    assert ours.shape == q.shape and ours.dtype == q.dtype
    if covered is not None:
        ours, theirs, reference = ours[covered], theirs[covered], reference[covered]
    assert_flash_rule(ours, theirs, reference, FLOOR[q.dtype])
    return ours


def layout_inputs(depths, num_steps, heads, head_dim, dtype, device=DEVICE):
    layout = rk.depth_sort(depths.to(device), num_steps)
    total = depths.numel()
    # q, k, v come from one (M, 3, H, D) projection, as in the model: non-contiguous views
    q, k, v = torch.randn(total, 3, heads, head_dim, dtype=dtype, device=device).unbind(1)
    return layout, q, k, v


def run_all_steps(depths, num_steps, kv, dtype, heads=2, head_dim=32, seqused=False):
    batch, tokens = depths.shape
    layout, q, k, v = layout_inputs(depths, num_steps, heads, head_dim, dtype)
    total = batch * tokens
    for step in range(1, num_steps + 1):
        if seqused:  # one table, static starts, used lengths: uncovered rows are unspecified
            used = layout.image_lengths[step - 1]
            covered = layout.attention_rows(step, int(layout.step_rows[step - 1]))
            if covered.numel():
                check_against_reference(q, k, v, layout.all_rows_cu_seqlens(), used,
                                        used if kv == "active" else None, tokens, tokens,
                                        layout.image_order, form=attention_used, covered=covered)
            continue
        q_rows = layout.attention_rows(step, total)  # static bound, as in the sync-free path
        cu_q = layout.cu_seqlens[step - 1]
        if kv == "active":
            kv_rows, cu_k = q_rows, cu_q
        else:
            kv_rows, cu_k = layout.image_order, layout.all_rows_cu_seqlens()
        out = check_against_reference(q, k, v, cu_q, cu_k, tokens, tokens, q_rows, kv_rows)
        inactive = torch.ones(total, dtype=torch.bool, device=q.device)
        inactive[q_rows[: int(layout.step_rows[step - 1])]] = False
        assert not out[inactive].any(), "rows outside every segment must be zero"


PROFILES = {
    "random": lambda: torch.randint(1, 4, (3, 17)),
    "all_depth_1": lambda: torch.ones(2, 17, dtype=torch.int64),
    "all_depth_L": lambda: torch.full((2, 17), 3),
    "one_active_token": lambda: torch.ones(1, 50, dtype=torch.int64).index_fill_(1, torch.tensor([7]), 3),
    "batch_1_odd_50": lambda: torch.randint(1, 4, (1, 50)),
    "long_segments_130": lambda: torch.randint(1, 4, (2, 130)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_depth_profiles(profile, kv, dtype):
    run_all_steps(PROFILES[profile](), 3, kv, dtype)


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_depth_profiles_used_lengths(profile, kv):
    run_all_steps(PROFILES[profile](), 3, kv, torch.float16, seqused=True)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_head_dims(head_dim, dtype):
    run_all_steps(torch.randint(1, 3, (2, 17)), 2, "active", dtype, heads=1, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_plain_flash_attention_convention(dtype):
    """No index tables, arbitrary segment lengths (one empty), contiguous and strided inputs."""
    cu = torch.tensor([0, 5, 5, 22, 70], dtype=torch.int32, device=DEVICE)
    q = torch.randn(70, 2, 32, dtype=dtype, device=DEVICE)
    k = torch.randn(70, 2, 64, dtype=dtype, device=DEVICE)[..., ::2]
    v = torch.randn(2, 70, 32, dtype=dtype, device=DEVICE).transpose(0, 1)
    check_against_reference(q, k, v, cu, cu, 48, 48, None, None)


def check_gradients(q, k, v, *args, form=attention):
    """dq, dk, dv of the Triton backward vs an fp64 reference <= 2x the eager op's error in the same
    dtype + floor, for a fresh random output gradient; returns the Triton gradients."""
    grad_out = torch.randn_like(q)
    grads = {}
    for name, dtype, backend in (("ours", q.dtype, "triton"), ("theirs", q.dtype, "eager"),
                                 ("reference", torch.float64, "eager")):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        form(*leaves, *args, backend=backend).backward(grad_out.to(dtype))
        grads[name] = [t.grad for t in leaves]
    for ours, theirs, reference in zip(grads["ours"], grads["theirs"], grads["reference"]):
        assert ours.dtype == q.dtype
        assert_flash_rule(ours, theirs, reference, FLOOR[q.dtype])
    return grads["ours"]


def run_all_steps_backward(depths, num_steps, kv, dtype, heads=2, head_dim=32, seqused=False):
    """The gradients of every step's attention, through the model's index tables."""
    batch, tokens = depths.shape
    layout, q, k, v = layout_inputs(depths, num_steps, heads, head_dim, dtype)
    total = batch * tokens
    for step in range(1, num_steps + 1):
        if seqused:
            used = layout.image_lengths[step - 1]
            check_gradients(q, k, v, layout.all_rows_cu_seqlens(), used, used if kv == "active" else None,
                            tokens, tokens, layout.image_order, form=attention_used)
            continue
        q_rows = layout.attention_rows(step, total)
        cu_q = layout.cu_seqlens[step - 1]
        kv_rows, cu_k = (q_rows, cu_q) if kv == "active" else (layout.image_order,
                                                               layout.all_rows_cu_seqlens())
        dq, dk, dv = check_gradients(q, k, v, cu_q, cu_k, tokens, tokens, q_rows, kv_rows)
        inactive = torch.ones(total, dtype=torch.bool, device=q.device)
        inactive[q_rows[: int(layout.step_rows[step - 1])]] = False
        assert not dq[inactive].any(), "rows outside every segment get no gradient"
        if kv == "active":
            assert not dk[inactive].any() and not dv[inactive].any()


BACKWARD_PROFILES = ("random", "all_depth_1", "one_active_token", "batch_1_odd_50")


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", BACKWARD_PROFILES)
def test_backward_depth_profiles(profile, kv):
    run_all_steps_backward(PROFILES[profile](), 3, kv, torch.float16)


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_used_lengths(dtype, kv):
    """The sync-free form: one table, static starts, used lengths (0 for images whose every token
    exited at step 3 of a 4-step draw)."""
    depths = torch.randint(1, 5, (3, 17))
    depths[1] = torch.randint(1, 3, (17,))  # image 1 has no active token from step 3 on
    run_all_steps_backward(depths, 4, kv, dtype, seqused=True)


@pytest.mark.parametrize("head_dim", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_head_dims(head_dim, dtype):
    run_all_steps_backward(torch.randint(1, 3, (2, 17)), 2, "all", dtype, heads=1, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_empty_segments_and_clamps(dtype):
    """Plain varlen with strided inputs: a segment without queries or keys, one with queries but no
    keys (zero output and dq), one with keys but no queries (zero dk, dv), one query left, and the
    max_seqlen clamps cutting two segments (positions past them get no gradient)."""
    cu_q = torch.tensor([0, 5, 5, 9, 9, 10, 31], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 7, 7, 7, 20, 33, 50], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 31, 32, dtype=dtype, device=DEVICE).transpose(0, 1)
    k = torch.randn(50, 2, 64, dtype=dtype, device=DEVICE)[..., ::2]
    v = torch.randn(50, 2, 32, dtype=dtype, device=DEVICE)
    for max_q, max_k in ((21, 17), (16, 11)):
        dq, dk, dv = check_gradients(q, k, v, cu_q, cu_k, max_q, max_k, None, None)
        assert not dq[5:9].any(), "queries without keys get no gradient"
        assert not dk[7:20].any() and not dv[7:20].any(), "keys without queries get no gradient"
        assert dq[9].abs().sum() > 0 and dk[20:20 + max_k].abs().sum() > 0
    assert not dq[10 + 16:].any() and not dk[33 + 11:].any(), "positions past max_seqlen are unused"


def test_a_key_row_shared_by_two_segments(caplog, monkeypatch):
    """kv_rows naming key row 3 in both segments (and row 5 twice in one): the forward is right,
    but the backward stores each key row's dk/dv once, so with autograd recording the triton
    backend declines the call (where values are checkable) and auto runs it on packed, whose
    gradient adds both contributions; positions past the used length or max_seqlen_k may repeat."""
    q, k, v = torch.randn(3, 6, 2, 32, device=DEVICE).unbind(0)
    cu_q = torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 4, 8], dtype=torch.int32, device=DEVICE)
    shared = torch.tensor([0, 1, 3, 5, 3, 5, 2, 4], device=DEVICE)
    args = (cu_q, cu_k, 3, 4, 32 ** -0.5)

    def run(backend, rows=shared, max_k=4, **kwargs):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = rk.varlen_attention(*leaves, cu_q, cu_k, 3, max_k, 32 ** -0.5, kv_rows=rows, backend=backend,
                                  **kwargs)
        out.backward(torch.ones_like(out))
        return out, [t.grad for t in leaves]

    with torch.no_grad():  # inference: nothing to lose, the kernel runs it
        torch.testing.assert_close(rk.varlen_attention(q, k, v, *args, kv_rows=shared, backend="triton"),
                                   rk.varlen_attention(q, k, v, *args, kv_rows=shared, backend="eager"))
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this call: kv_rows names key "
                                           "row 3 at two read positions"):
        run("triton")
    expected_out, expected = run("eager")
    separate_k, separate_v = k[shared], v[shared]  # the same attention over copied rows
    leaves = [t.clone().requires_grad_() for t in (q, separate_k, separate_v)]
    rk.varlen_attention(*leaves, *args, backend="eager").backward(torch.ones_like(q))
    for ours, copies, rows in ((expected[1], leaves[1].grad, shared), (expected[2], leaves[2].grad, shared)):
        torch.testing.assert_close(ours, torch.zeros_like(ours).index_add_(0, rows, copies))
    monkeypatch.setattr(rk._backend, "_on_cpu", lambda args: False)  # the GPU's fall-back chain
    with caplog.at_level("INFO", logger="recvit_kernels"):
        out, grads = run("auto")
    assert "falling back from triton: kv_rows names key row 3" in caplog.text
    torch.testing.assert_close(out, expected_out)
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs)
    # only the positions read count: past a used length, or past max_seqlen_k, rows may repeat
    run("triton", torch.tensor([0, 1, 3, 5, 2, 4, 5, 5], device=DEVICE),
        seqused_k=torch.tensor([4, 2], dtype=torch.int32, device=DEVICE))
    run("triton", torch.tensor([0, 1, 3, 5, 2, 4, 0, 1], device=DEVICE), max_k=2)


@pytest.mark.parametrize("backend", ["eager", "packed", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("queries,keys", [(0, 5), (4, 0), (0, 0)])
@pytest.mark.parametrize("tables", [False, True], ids=["plain", "tables"])
def test_no_query_rows_or_no_key_rows(backend, queries, keys, tables):
    """No query rows: an empty output shaped like q. No key rows: every query attends to nothing,
    so its output is zero (as torch's SDPA gives without keys). Gradients are zero, and empty for
    the empty tensors. Eager indexed row 0 of the empty tensor (an IndexError)."""
    if backend == "cuda" and rk.unavailable_reason("cuda") is not None:
        pytest.skip(rk.unavailable_reason("cuda"))
    grad = backend != "cuda"  # the cuda kernel is forward-only, fp16 / bf16
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q = torch.randn(queries, 2, 32, dtype=dtype, device=DEVICE, requires_grad=grad)
    k, v = (torch.randn(keys, 2, 32, dtype=dtype, device=DEVICE, requires_grad=grad) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, rows // 2, rows], dtype=torch.int32, device=DEVICE) for rows in (queries, keys))
    extra = {}
    if tables:
        extra = dict(q_rows=torch.randperm(queries, device=DEVICE), kv_rows=torch.randperm(keys, device=DEVICE),
                     seqused_q=cu_q.diff(), seqused_k=cu_k.diff())
    with torch.set_grad_enabled(grad):
        out = rk.varlen_attention(q, k, v, cu_q, cu_k, 4, 4, **extra, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and not out.any()
    if grad:
        out.backward(torch.randn_like(out))
        for tensor in (q, k, v):
            assert tensor.grad.shape == tensor.shape and not tensor.grad.any()


def test_double_backward_is_refused():
    q, k, v, cu = (t.requires_grad_() if t.is_floating_point() else t for t in _plain_inputs())
    out = rk.varlen_attention(q, k, v, cu, cu, 11, 11, backend="triton")
    (grad_q,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    # the backward kernels' custom op has no autograd formula of its own
    with pytest.raises(RuntimeError, match="varlen_attention_backward_triton.*no autograd formula"):
        grad_q.sum().backward()


def test_backward_launches_two_kernels_and_no_eager_attention():
    """The backward runs the Triton dQ and dK/dV kernels, not a recomputed eager attention."""
    from launches import trace_launches

    layout, q, k, v = layout_inputs(torch.randint(1, 4, (2, 17)), 3, 2, 32, torch.float32)
    rows = layout.attention_rows(2, 34)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, layout.cu_seqlens[1], layout.cu_seqlens[1], 17, 17, rows, rows, "triton")
    with trace_launches(execute=True) as trace:
        out.backward(torch.randn_like(out))
    names = [launch.name for launch in trace.launches]
    assert names.count("_varlen_attention_dq_kernel") == 1, names
    assert names.count("_varlen_attention_dkdv_kernel") == 1, names
    assert not any("attention" in name and launch.kind == "aten"
                   for name, launch in zip(names, trace.launches)), names


def _plain_inputs(head_dim=32, dtype=torch.float32):
    cu = torch.tensor([0, 9, 20], dtype=torch.int32, device=DEVICE)
    q, k, v = torch.randn(20, 3, 2, head_dim, dtype=dtype, device=DEVICE).unbind(1)
    return q, k, v, cu


def test_unsupported_head_dim_errors_or_falls_back(caplog, monkeypatch):
    # auto sends CPU tensors to packed; take the GPU's fall-back chain through the interpreter
    monkeypatch.setattr(rk._backend, "_on_cpu", lambda args: False)
    q, k, v, cu = _plain_inputs(head_dim=48)
    with pytest.raises(RuntimeError, match="head_dim 48"):
        rk.varlen_attention(q, k, v, cu, cu, 11, 11, backend="triton")
    with caplog.at_level("INFO", logger="recvit_kernels"):
        out = rk.varlen_attention(q, k, v, cu, cu, 11, 11, backend="auto")
    assert "falling back from triton: head_dim 48" in caplog.text
    torch.testing.assert_close(out, rk.varlen_attention(q, k, v, cu, cu, 11, 11, backend="eager"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bf16 limitation")
def test_bf16_under_interpreter_is_refused():
    q, k, v, cu = _plain_inputs(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        rk.varlen_attention(q, k, v, cu, cu, 11, 11, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v, cu = _plain_inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rk.varlen_attention(q, k, v, cu, cu, 11, 11, backend="triton")


def test_bad_shapes_and_cu_seqlens():
    q, k, v, cu = _plain_inputs()
    with pytest.raises(ValueError, match="k: expected"):
        rk.varlen_attention(q, k[:, :1], v, cu, cu, 11, 11, backend="triton")
    with pytest.raises(ValueError, match="q: expected 3 dimensions"):
        rk.varlen_attention(q.flatten(1), k, v, cu, cu, 11, 11, backend="triton")
    with pytest.raises(ValueError, match="cu_seqlens_q: expected dtype"):
        rk.varlen_attention(q, k, v, cu.long(), cu, 11, 11, backend="triton")


# ---------------------------------------------------------------- GPU (skipped without CUDA)

@pytest.mark.gpu
@pytest.mark.parametrize("seqused", [False, True], ids=["cu_seqlens", "seqused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tokens", [197, 577, 1025])
@pytest.mark.parametrize("kv", ["active", "all"])
def test_gpu_real_sizes(tokens, kv, dtype, seqused):
    depths = torch.randint(1, 13, (4, tokens))
    depths[:, 0] = 12
    run_all_steps(depths, 12, kv, dtype, heads=12, head_dim=64, seqused=seqused)


@pytest.mark.gpu
@pytest.mark.parametrize("seqused", [False, True], ids=["cu_seqlens", "seqused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv", ["active", "all"])
def test_gpu_backward_real_sizes(kv, head_dim, dtype, seqused):
    depths = torch.randint(1, 13, (4, 197))
    depths[:, 0] = 12
    run_all_steps_backward(depths, 12, kv, dtype, heads=12, head_dim=head_dim, seqused=seqused)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["active", "all"])
def test_gpu_cuda_glue_with_used_lengths(kv):
    """The cuda kernel reads the used lengths (seqused_q/k) itself, over the one image_order table."""
    if rk.unavailable_reason("cuda") is not None:
        pytest.skip(rk.unavailable_reason("cuda"))
    depths = torch.randint(1, 13, (8, 197))
    layout, q, k, v = layout_inputs(depths, 12, 12, 64, torch.bfloat16)
    for step in range(1, 13):
        used = layout.image_lengths[step - 1]
        covered = layout.attention_rows(step, int(layout.step_rows[step - 1]))
        args = (layout.all_rows_cu_seqlens(), used, used if kv == "active" else None, 197, 197,
                layout.image_order)
        with torch.no_grad():
            ours = attention_used(q, k, v, *args, backend="cuda")[covered]
            theirs = attention_used(q, k, v, *args, backend="eager")[covered]
            reference = attention_used(q.double(), k.double(), v.double(), *args, backend="eager")[covered]
        assert_flash_rule(ours, theirs, reference, FLOOR[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_head_dims(head_dim, dtype):
    run_all_steps(torch.randint(1, 5, (8, 197)), 4, "active", dtype, heads=6, head_dim=head_dim)


_SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, recvit_kernels as rk
    depths = torch.randint(1, 5, (3, 197), device="cuda")
    layout = rk.depth_sort(depths, 4)
    q, k, v = torch.randn(3 * 197, 3, 12, 64, device="cuda", dtype=torch.float16).unbind(1)
    for step in range(1, 5):
        rows = layout.attention_rows(step, 3 * 197)
        rk.varlen_attention(q, k, v, layout.cu_seqlens[step - 1], layout.cu_seqlens[step - 1], 197, 197,
                            q_rows=rows, kv_rows=rows, backend="triton")
        rk.varlen_attention(q, k, v, layout.cu_seqlens[step - 1], layout.all_rows_cu_seqlens(), 197, 197,
                            q_rows=rows, kv_rows=layout.image_order, backend="triton")
    torch.cuda.synchronize()
""")


@pytest.mark.gpu
@pytest.mark.sanitizer
def test_gpu_compute_sanitizer_memcheck():
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "1", sys.executable,
                             "-c", _SANITIZER_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_gpu_fp32_follows_allow_tf32(head_dim, allow_tf32, set_allow_tf32):
    """fp32 attention is IEEE by default and TF32 when torch allows it, as the eager op's math SDPA
    (bmm) is: the same error against fp64 within the flash rule, for every head_dim's tile."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    set_allow_tf32(allow_tf32)
    with sdpa_kernel(SDPBackend.MATH):
        run_all_steps(torch.randint(1, 5, (8, 197)), 4, "active", torch.float32, heads=4, head_dim=head_dim)
