"""Every op's tensors laid out as a caller may hand them over: strided views (a bias[::2], a column of
a table, a transposed weight), storage offsets, int32 or int64 tables, fp16 or fp32. Hypothesis
draws the layouts; each op's result (and gradients) must match eager's on the same tensors (the
triton kernels read 1-D arguments as contiguous: strided ones gave wrong results, NaN, and
out-of-bounds reads). The gaps of every strided view hold NaN (or a wrong index), so a kernel
that reads them shows it. Runs the triton backend on the interpreter here, on the GPU where there
is one; the cuda backend's variants are marked ``gpu``.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recvit_kernels as rk
from tolerance import assert_flash_rule

pytestmark = pytest.mark.skipif(rk.unavailable_reason("triton") is not None,
                                reason=str(rk.unavailable_reason("triton")))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Deterministic (CI): the same examples on every run; few, as the interpreter is slow.
EXAMPLES = settings(max_examples=12, deadline=None, derandomize=True, database=None)
FLOATS = st.sampled_from([torch.float32, torch.float16])
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3}


def laid_out(draw, values, unit_columns=False):
    """``values`` copied into a drawn layout: each dimension strided by 1-3, the dimensions in a drawn
    order, at a storage offset of 0-3 elements; the storage's other elements are NaN (floats) or 0
    (integers: a wrong length or index). ``unit_columns`` keeps the last dimension contiguous."""
    dims = values.dim()
    steps = [draw(st.integers(1, 3)) for _ in range(dims)]
    order = list(range(dims))
    if unit_columns and dims:
        steps[-1] = 1
        order = draw(st.permutations(order[:-1])) + order[-1:]
    else:
        order = draw(st.permutations(order))
    offset = draw(st.integers(0, 3))
    outer = [values.shape[d] * steps[d] for d in order]
    fill = math.nan if values.dtype.is_floating_point else 0
    storage = torch.full((offset + math.prod(outer),), fill, dtype=values.dtype, device=values.device)
    view = storage[offset:].view(outer)[tuple(slice(None, None, steps[d]) for d in order)]
    view = view.permute([order.index(d) for d in range(dims)])
    return view.copy_(values)


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def run_three_ways(op, args, dtype, output_grads=None):
    """``op(*args)`` (the float tensors in their drawn layouts) by triton, by eager in ``dtype`` and by
    eager in float64 (copies); with ``output_grads`` (one per output, in drawn layouts) also the
    float tensors' gradients. Returns [(outputs, gradients)] in that order."""
    results = []
    for backend, precision in (("triton", dtype), ("eager", dtype), ("eager", torch.float64)):
        floats = [isinstance(a, torch.Tensor) and a.dtype.is_floating_point for a in args]
        call = [a.to(precision).detach().requires_grad_(output_grads is not None) if is_float else a
                for a, is_float in zip(args, floats)]
        with torch.set_grad_enabled(output_grads is not None):
            out = op(*call, backend=backend)
        outs = list(out) if isinstance(out, tuple) else [out]
        grads = []
        if output_grads is not None:
            torch.autograd.backward(outs, [g.to(precision) for g in output_grads])
            grads = [a.grad for a, is_float in zip(call, floats) if is_float]
        results.append((outs, grads))
    return results


def check_three_ways(results, dtype, rows=None):
    """Triton's outputs (their ``rows`` if given) and gradients against eager's by the tolerance rule."""
    (ours, our_grads), (theirs, their_grads), (reference, reference_grads) = results
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    for a, b, ref in zip(ours, theirs, reference):
        assert_flash_rule(pick(a), pick(b), pick(ref), FLOOR[dtype])
    for a, b, ref in zip(our_grads, their_grads, reference_grads):
        assert_flash_rule(a, b, ref, FLOOR[dtype])


def into_out(op, args, dtype, draw, initial):
    """``op(*args, out=out)`` (inference) into a buffer drawn with unit column stride holding
    ``initial``: by triton, by eager in ``dtype`` and in float64, as :func:`run_three_ways`."""
    results = []
    for backend, precision in (("triton", dtype), ("eager", dtype), ("eager", torch.float64)):
        out = laid_out(draw, initial.to(precision), unit_columns=True)
        call = [a.to(precision) if isinstance(a, torch.Tensor) and a.dtype.is_floating_point else a
                for a in args]
        with torch.no_grad():
            op(*call, out=out, backend=backend)
        results.append(([out], []))
    return results


@EXAMPLES
@given(st.data())
def test_layer_norm_strided(data):
    draw = data.draw
    dtype, rows, width = draw(FLOATS), draw(st.integers(1, 6)), draw(st.sampled_from([8, 12, 32]))
    x = laid_out(draw, randn(rows, width, dtype=dtype))
    weight = laid_out(draw, randn(width, dtype=dtype))
    bias = laid_out(draw, randn(width, dtype=dtype)) if draw(st.booleans()) else None
    residual = laid_out(draw, randn(rows, width, dtype=dtype)) if draw(st.booleans()) else None
    args = [x, weight, bias, 1e-5, residual]
    if draw(st.booleans()):  # inference on the live rows: the others are unspecified
        live = draw(st.integers(0, rows))
        count = laid_out(draw, torch.tensor([live], device=DEVICE,
                                            dtype=draw(st.sampled_from([torch.int32, torch.int64]))))
        results = run_three_ways(lambda *a, **k: rk.layer_norm(*a, num_rows=count, **k), args, dtype)
        check_three_ways(results, dtype, rows=slice(0, live))
    else:
        grads = [laid_out(draw, randn(rows, width, dtype=dtype)) for _ in range(1 + (residual is not None))]
        check_three_ways(run_three_ways(rk.layer_norm, args, dtype, grads), dtype)


@EXAMPLES
@given(st.data())
def test_prefix_linear_strided(data):
    draw = data.draw
    dtype, rows = draw(FLOATS), draw(st.integers(1, 40))
    k_dim, n_out = draw(st.sampled_from([8, 16, 24])), draw(st.sampled_from([8, 16, 40]))
    live = draw(st.integers(0, rows))
    activation = draw(st.sampled_from([None, "gelu"]))
    x = laid_out(draw, randn(rows, k_dim, dtype=dtype))
    weight = laid_out(draw, randn(n_out, k_dim, dtype=dtype))
    bias = laid_out(draw, randn(n_out, dtype=dtype)) if draw(st.booleans()) else None
    residual = laid_out(draw, randn(rows, n_out, dtype=dtype)) if draw(st.booleans()) else None
    count = laid_out(draw, torch.tensor([live], device=DEVICE,
                                        dtype=draw(st.sampled_from([torch.int32, torch.int64]))))

    def linear(x, weight, bias, residual, **kwargs):
        return rk.prefix_linear(x, weight, bias, count, activation, residual, **kwargs)

    args = [x, weight, bias, residual]
    if draw(st.booleans()):  # in place into a caller's buffer: its rows past the count are kept
        results = into_out(linear, args, dtype, draw, randn(rows, n_out, dtype=dtype))
        check_three_ways(results, dtype)
    else:
        grads = [laid_out(draw, randn(rows, n_out, dtype=dtype))]
        check_three_ways(run_three_ways(linear, args, dtype, grads), dtype, rows=slice(0, live))


@EXAMPLES
@given(st.data())
def test_mlp_strided(data):
    draw = data.draw
    dtype, rows = draw(FLOATS), draw(st.integers(1, 9))
    width, hidden, n_out = (draw(st.sampled_from([8, 16, 24])) for _ in range(3))
    x = laid_out(draw, randn(rows, width, dtype=dtype))
    fc1_weight = laid_out(draw, randn(hidden, width, dtype=dtype))
    fc1_bias = laid_out(draw, randn(hidden, dtype=dtype)) if draw(st.booleans()) else None
    fc2_weight = laid_out(draw, randn(n_out, hidden, dtype=dtype))
    fc2_bias = laid_out(draw, randn(n_out, dtype=dtype)) if draw(st.booleans()) else None
    residual = laid_out(draw, randn(rows, n_out, dtype=dtype)) if draw(st.booleans()) else None
    args = [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual]
    if draw(st.booleans()):
        results = into_out(rk.mlp, args, dtype, draw, torch.zeros(rows, n_out, device=DEVICE))
        check_three_ways(results, dtype)
    else:
        grads = [laid_out(draw, randn(rows, n_out, dtype=dtype))]
        check_three_ways(run_three_ways(rk.mlp, args, dtype, grads), dtype)


def covered_rows(cu_seqlens, seqused, max_seqlen, rows):
    """The tensor rows whose queries a segment uses (the others are unspecified with seqused_q)."""
    cu = cu_seqlens.tolist()
    covered = []
    for b in range(len(cu) - 1):
        length = cu[b + 1] - cu[b] if seqused is None else int(seqused[b])
        positions = range(cu[b], cu[b] + min(length, max_seqlen))
        covered += [int(rows[p]) if rows is not None else p for p in positions]
    return torch.tensor(covered, dtype=torch.int64, device=cu_seqlens.device)


@EXAMPLES
@given(st.data())
def test_varlen_attention_strided(data):
    draw = data.draw
    dtype, heads, head_dim = draw(FLOATS), draw(st.integers(1, 2)), 16
    # no query or no key rows at all too (eager indexed row 0 of an empty q or k for its padding)
    lengths_q = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))
    lengths_k = draw(st.lists(st.integers(0, 9), min_size=len(lengths_q), max_size=len(lengths_q)))
    tables = {}
    for side, lengths in (("q", lengths_q), ("k", lengths_k)):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        tables[side] = laid_out(draw, cu)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    q_rows = laid_out(draw, torch.randperm(total_q, device=DEVICE).to(index_dtype)) if draw(st.booleans()) else None
    kv_rows = laid_out(draw, torch.randperm(total_k, device=DEVICE).to(index_dtype)) if draw(st.booleans()) else None
    used = {}
    for side, lengths in (("q", lengths_q), ("k", lengths_k)):
        if draw(st.booleans()):
            values = [draw(st.integers(0, length)) for length in lengths]
            used[side] = laid_out(draw, torch.tensor(values, dtype=torch.int32, device=DEVICE))
    max_q, max_k = max(lengths_q + [1]), draw(st.integers(1, max(lengths_k + [1])))
    q = laid_out(draw, randn(total_q, heads, head_dim, dtype=dtype))
    k = laid_out(draw, randn(total_k, heads, head_dim, dtype=dtype))
    v = laid_out(draw, randn(total_k, heads, head_dim, dtype=dtype))
    covered = covered_rows(tables["q"], used.get("q"), max_q, q_rows)

    def attention(q, k, v, **kwargs):
        return rk.varlen_attention(q, k, v, tables["q"], tables["k"], max_q, max_k, q_rows=q_rows,
                                   kv_rows=kv_rows, seqused_q=used.get("q"), seqused_k=used.get("k"),
                                   **kwargs)

    grads = [laid_out(draw, randn(total_q, heads, head_dim, dtype=dtype))]
    check_three_ways(run_three_ways(attention, [q, k, v], dtype, grads), dtype, rows=covered)


@EXAMPLES
@given(st.data())
def test_depth_sort_pack_unpack_strided(data):
    draw = data.draw
    batch, tokens, num_steps = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
    values = torch.randint(1, num_steps + 1, (batch, tokens), device=DEVICE)
    depths = laid_out(draw, values.to(draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))))
    layout = rk.depth_sort(depths, num_steps, backend="triton")
    expected = rk.depth_sort(values, num_steps, backend="eager")
    for name in ("perm", "inverse_perm", "step_rows", "image_lengths", "cu_seqlens", "image_order"):
        assert torch.equal(getattr(layout, name), getattr(expected, name)), name
    x = laid_out(draw, torch.randn(batch, tokens, 5, device=DEVICE))
    rows = rk.pack(x, layout)
    assert torch.equal(rows, x.reshape(-1, 5)[expected.perm])
    assert torch.equal(rk.unpack(laid_out(draw, rows), layout), x)



@pytest.mark.gpu
@EXAMPLES
@given(st.data())
def test_cuda_backend_strided_and_misaligned(data):
    """The cuda backend (inference, fp16) on drawn layouts, storage offsets included: a contiguous
    tensor at an odd offset is misaligned for the 16-byte cp.async, and the binding's contiguous()
    handed it over as it was (a fault that kills the process). Compared with eager in fp16 at a
    loose tolerance: what this catches is garbage, NaN or a fault."""
    assert rk.unavailable_reason("cuda") is None, rk.unavailable_reason("cuda")
    draw = data.draw
    dtype, rows = torch.float16, draw(st.integers(1, 80))
    live = draw(st.integers(0, rows))
    count = laid_out(draw, torch.tensor([live], device=DEVICE))
    x = laid_out(draw, randn(rows, 64, dtype=dtype))
    fc1_weight, fc1_bias = laid_out(draw, randn(48, 64, dtype=dtype)), laid_out(draw, randn(48, dtype=dtype))
    fc2_weight, fc2_bias = laid_out(draw, randn(64, 48, dtype=dtype)), laid_out(draw, randn(64, dtype=dtype))
    residual = laid_out(draw, randn(rows, 48, dtype=dtype))
    norm_weight, norm_bias = laid_out(draw, randn(64, dtype=dtype)), laid_out(draw, randn(64, dtype=dtype))
    lengths = draw(st.lists(st.integers(1, 70), min_size=1, max_size=3))
    cu = laid_out(draw, torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                     device=DEVICE))
    q, k, v = (laid_out(draw, randn(sum(lengths), 2, 32, dtype=dtype)) for _ in range(3))
    calls = {
        "prefix_linear": lambda backend: rk.prefix_linear(x, fc1_weight, fc1_bias, count, "gelu", residual,
                                                          backend=backend)[:live],
        "layer_norm": lambda backend: rk.layer_norm(x, norm_weight, norm_bias, 1e-5, backend=backend),
        "mlp": lambda backend: rk.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend=backend),
        "varlen_attention": lambda backend: rk.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths),
                                                                backend=backend),
    }
    with torch.no_grad():
        for name, call in calls.items():
            torch.testing.assert_close(call("cuda"), call("eager"), atol=3e-2, rtol=3e-2, msg=name)
