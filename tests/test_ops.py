"""The eager ops against obviously-correct references, and their argument checks."""
import re

import pytest
import torch
import torch.nn.functional as F

import recvit_kernels as rk


def random_depths(batch, tokens, num_steps, profile="random"):
    if profile == "random":
        return torch.randint(1, num_steps + 1, (batch, tokens))
    if profile == "all_one":
        return torch.ones(batch, tokens, dtype=torch.long)
    if profile == "all_deep":
        return torch.full((batch, tokens), num_steps)
    if profile == "single":
        depths = torch.ones(batch, tokens, dtype=torch.long)
        depths[0, tokens // 2] = num_steps
        return depths
    raise ValueError(profile)


PROFILES = ["random", "all_one", "all_deep", "single"]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("batch,tokens", [(1, 1), (1, 17), (3, 50), (2, 197)])
def test_depth_sort_matches_definition(profile, batch, tokens):
    num_steps = 12
    depths = random_depths(batch, tokens, num_steps, profile)
    layout = rk.depth_sort(depths, num_steps)
    flat = depths.reshape(-1)
    # stable sort by depth descending
    expected_perm = torch.tensor(sorted(range(flat.numel()), key=lambda i: (-int(flat[i]), i)))
    assert torch.equal(layout.perm, expected_perm)
    assert torch.equal(layout.perm[layout.inverse_perm], torch.arange(flat.numel()))
    for step in range(1, num_steps + 1):
        active = depths >= step
        assert layout.step_rows[step - 1] == active.sum()
        assert torch.equal(layout.image_lengths[step - 1], active.sum(1).int())
        # the active rows are exactly the prefix
        assert bool((flat[layout.perm[: int(active.sum())]] >= step).all())
        rows = layout.attention_rows(step, int(active.sum()))
        cu = layout.cu_seqlens[step - 1].tolist()
        for b in range(batch):
            tokens_of_b = layout.perm[rows[cu[b]:cu[b + 1]]]
            assert bool((tokens_of_b // tokens == b).all())
            assert sorted(tokens_of_b.tolist()) == [b * tokens + i for i in range(tokens) if active[b, i]]


def test_pack_unpack_round_trip():
    depths = random_depths(3, 50, 12)
    layout = rk.depth_sort(depths, 12)
    x = torch.randn(3, 50, 8)
    assert torch.equal(rk.unpack(rk.pack(x, layout), layout), x)


def test_check_depths_names_the_argument():
    with pytest.raises(ValueError, match="depths.*1..12"):
        rk.check_depths(torch.tensor([[0, 3]]), 12)
    with pytest.raises(ValueError, match="depths.*1..12"):
        rk.check_depths(torch.tensor([[13, 3]]), 12)
    with pytest.raises(ValueError, match="depths.*shape"):
        rk.check_depths(torch.ones(3, dtype=torch.long), 12)
    with pytest.raises(ValueError, match="depths.*integer"):
        rk.check_depths(torch.ones(2, 3), 12)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (3, 0)])
def test_depth_sort_rejects_empty_depths(shape):
    with pytest.raises(ValueError, match=r"depths: expected a non-empty shape.*" + re.escape(str(shape))):
        rk.depth_sort(torch.empty(shape, dtype=torch.long), 4)


def segment_loop_attention(q, k, v, cu_q, cu_k, scale, q_rows=None, kv_rows=None):
    """The obvious reference: one softmax per segment, in fp64."""
    out = torch.zeros_like(q, dtype=torch.float64)
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cu_q) - 1):
        qi = torch.arange(cu_q[b], cu_q[b + 1]) if q_rows is None else q_rows[cu_q[b]:cu_q[b + 1]]
        ki = torch.arange(cu_k[b], cu_k[b + 1]) if kv_rows is None else kv_rows[cu_k[b]:cu_k[b + 1]]
        if len(qi) == 0:
            continue
        qb, kb, vb = q[qi].double(), k[ki].double(), v[ki].double()
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        out[qi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vb)
    return out


def attention_error_bound(reference, *outputs):
    return max(float((o.double() - reference).abs().max()) for o in outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths", [[5], [1, 7, 3], [17, 0, 50], [1]])
def test_varlen_attention_matches_segment_loop(dtype, lengths):
    heads, head_dim = 2, 16
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, heads, head_dim, dtype=dtype) for _ in range(3))
    out = rk.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths))
    reference = segment_loop_attention(q, k, v, cu, cu, head_dim ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), reference, atol=tolerance, rtol=0)


def test_varlen_attention_index_tables_and_uncovered_rows():
    heads, head_dim = 2, 8
    q = torch.randn(10, heads, head_dim)
    k, v = torch.randn(12, heads, head_dim), torch.randn(12, heads, head_dim)
    q_rows = torch.tensor([3, 0, 7, 5, 1])  # rows 2, 4, 6, 8, 9 uncovered
    kv_rows = torch.randperm(12)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 12], dtype=torch.int32)
    out = rk.varlen_attention(q, k, v, cu_q, cu_k, 4, 6, 0.3, q_rows=q_rows, kv_rows=kv_rows)
    reference = segment_loop_attention(q, k, v, cu_q, cu_k, 0.3, q_rows, kv_rows)
    torch.testing.assert_close(out.double(), reference, atol=1e-6, rtol=0)
    assert bool((out[[2, 4, 6, 8, 9]] == 0).all())


def test_varlen_attention_gradients_match_reference():
    q, k, v = (torch.randn(9, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    rk.varlen_attention(q, k, v, cu, cu, 5, 5).pow(2).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    segment_loop_attention(q, k, v, cu, cu, 8 ** -0.5).pow(2).sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.parametrize("bad,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)), "cu_seqlens_q.*non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9])), "cu_seqlens_q.*int32"),
    (dict(cu_seqlens_k=torch.tensor([1, 4, 9], dtype=torch.int32)), "cu_seqlens_k.*start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 99], dtype=torch.int32)), "cu_seqlens_k.*exceeds"),
    (dict(k=torch.randn(9, 3, 8)), "k: expected"),
    (dict(v=torch.randn(9, 2, 8, dtype=torch.float64)), "v: expected dtype"),
    (dict(q=torch.randn(9, 16)), "q: expected 3 dimensions"),
    (dict(max_seqlen_q=0), "max_seqlen_q"),
    (dict(q_rows=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 20])), "q_rows"),
    (dict(seqused_q=torch.tensor([1, 2])), "seqused_q: expected dtype torch.int32"),
    (dict(seqused_q=torch.tensor([1], dtype=torch.int32)), "seqused_q: expected 2 entries"),
    (dict(seqused_k=torch.tensor([5, 2], dtype=torch.int32)), "seqused_k: entries must lie in 0..the"),
    (dict(seqused_k=torch.tensor([-1, 2], dtype=torch.int32)), "seqused_k: entries must lie"),
])
def test_varlen_attention_bad_input(bad, match):
    args = dict(q=torch.randn(9, 2, 8), k=torch.randn(9, 2, 8), v=torch.randn(9, 2, 8),
                cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen_q=5, max_seqlen_k=5)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        rk.varlen_attention(**args)


def test_layer_norm_with_residual():
    x, residual = torch.randn(7, 16), torch.randn(7, 16)
    weight, bias = torch.randn(16), torch.randn(16)
    out, summed = rk.layer_norm(x, weight, bias, 1e-6, residual=residual)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(out, F.layer_norm(x + residual, (16,), weight, bias, 1e-6))
    with pytest.raises(ValueError, match="weight"):
        rk.layer_norm(x, torch.ones(8), None)
    with pytest.raises(ValueError, match="residual"):
        rk.layer_norm(x, weight, bias, residual=torch.randn(3, 16))


def test_mlp_matches_modules():
    block_mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x, residual = torch.randn(5, 16), torch.randn(5, 16)
    out = rk.mlp(x, block_mlp[0].weight, block_mlp[0].bias, block_mlp[2].weight, block_mlp[2].bias,
                 residual=residual)
    torch.testing.assert_close(out, block_mlp(x) + residual)
    with pytest.raises(ValueError, match="fc1_weight"):
        rk.mlp(x, torch.randn(64, 8), None, block_mlp[2].weight, None)


def test_backend_selection_and_errors(monkeypatch):
    assert rk.resolve_backend("packed") == "packed"
    monkeypatch.setenv("RECVIT_BACKEND", "eager")
    assert rk.resolve_backend() == "eager"
    monkeypatch.setenv("RECVIT_BACKEND", "fast")
    with pytest.raises(ValueError, match="RECVIT_BACKEND='fast'"):
        rk.resolve_backend()
    monkeypatch.setenv("RECVIT_BACKEND", "")  # `RECVIT_BACKEND= python ...`: unset, as recvit info says
    assert rk.resolve_backend() == "auto"
    x = torch.randn(2, 4)
    torch.testing.assert_close(rk.layer_norm(x, torch.ones(4), None), rk.layer_norm(x, torch.ones(4), None,
                                                                                     backend="eager"))
    with pytest.raises(ValueError, match="backend='nope'"):
        rk.layer_norm(torch.randn(2, 4), torch.ones(4), None, backend="nope")
    reasons = rk.available_backends()
    assert reasons["eager"] is None and reasons["packed"] is None
    for name in ("triton", "cuda"):
        assert reasons[name] is None or isinstance(reasons[name], str)


def test_triton_interpreter_reason_names_the_numpy_pin():
    """triton < 3.7's interpreter calls int() on 1-element arrays, a TypeError from numpy 2.4: the
    backend is then unavailable with the fix named, not 305 tracebacks from inside Triton."""
    from recvit_kernels.triton import _interpreter_reason

    for old_triton, new_numpy in (("3.6.0", "2.4.6"), ("3.5.1", "2.5.0"), ("3.6.0", "2.4.0rc1")):
        reason = _interpreter_reason(old_triton, new_numpy)
        assert f"triton {old_triton} fails under numpy {new_numpy}" in reason
        assert "pip install 'numpy<2.4'" in reason and "triton>=3.7" in reason
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.7.0", "2.5.0"),
                                          ("3.9.0+git4e1c2a", "2.4.6")):
        assert _interpreter_reason(triton_version, numpy_version) is None


def test_auto_runs_cpu_tensors_on_packed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, weight = torch.randn(3, 8), torch.ones(8)
    assert rk._backend.dispatch("layer_norm", "auto", x, weight, None, 1e-6, None) is \
        rk._backend._IMPLEMENTATIONS["layer_norm"]["packed"]


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_varlen_attention_segment_without_keys_gives_zero(backend):
    if rk.unavailable_reason(backend):
        pytest.skip(rk.unavailable_reason(backend))
    q, k, v = torch.randn(5, 2, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 3], dtype=torch.int32)  # segment 0 has queries but no keys
    out = rk.varlen_attention(q, k, v, cu_q, cu_k, 3, 3, backend=backend)
    assert bool((out[:2] == 0).all())
    reference = segment_loop_attention(q[2:], k, v, torch.tensor([0, 3]), torch.tensor([0, 3]), 16 ** -0.5)
    torch.testing.assert_close(out[2:].double(), reference, atol=1e-6, rtol=0)


def test_explicit_backend_without_the_op_hands_it_on(monkeypatch, caplog):
    # a stand-in "cuda" backend that is available but has no mlp kernel
    monkeypatch.setitem(rk._backend._AVAILABILITY, "cuda", lambda: None)
    monkeypatch.setitem(rk._backend._AVAILABILITY, "triton", lambda: "not here")
    monkeypatch.setattr(rk._backend, "_IMPLEMENTATIONS",
                        {op: {b: f for b, f in impls.items() if b != "cuda"}
                         for op, impls in rk._backend._IMPLEMENTATIONS.items()})
    x = torch.randn(3, 8)
    with caplog.at_level("INFO", logger="recvit_kernels"):
        chosen = rk._backend.dispatch("mlp", "cuda", x)
    assert chosen is rk._backend._IMPLEMENTATIONS["mlp"]["packed"]
    assert "falling back from cuda: the cuda backend has no mlp implementation" in caplog.text


def used_reference(q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, q_rows, kv_rows):
    """``segment_loop_attention`` on what each segment uses: the first ``used`` positions (all if
    None), at most ``max_seqlen`` of them; returns the output and the rows it covers."""
    def compact(cu, used, bound, rows):
        cu, picked, out_cu = cu.tolist(), [], [0]
        for b in range(len(cu) - 1):
            length = cu[b + 1] - cu[b] if used is None else int(used[b])
            picked += rows[cu[b]:cu[b] + min(length, bound)].tolist()
            out_cu.append(len(picked))
        return torch.tensor(out_cu), torch.tensor(picked, dtype=torch.int64)

    cu_q2, q_rows2 = compact(cu_q, used_q, max_q, q_rows)
    cu_k2, kv_rows2 = compact(cu_k, used_k, max_k, kv_rows)
    return segment_loop_attention(q, k, v, cu_q2, cu_k2, scale, q_rows2, kv_rows2), q_rows2


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("used", [True, False], ids=["seqused", "cu_seqlens"])
def test_varlen_attention_used_lengths_and_max_seqlen_bounds(backend, used):
    """Used lengths (flash-attention 3's seqused_q/k) and the max_seqlen bounds, which every
    backend applies alike: a segment contributes at most its first max_seqlen_q queries and
    max_seqlen_k keys (flash-attention sizes its launch by them; queries past are uncovered)."""
    if rk.unavailable_reason(backend):
        pytest.skip(rk.unavailable_reason(backend))
    q, k, v = torch.randn(20, 2, 16), torch.randn(24, 2, 16), torch.randn(24, 2, 16)
    q_rows, kv_rows = torch.randperm(20), torch.randperm(24)
    cu_q = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 10, 14, 24], dtype=torch.int32)
    used_q = torch.tensor([5, 0, 11], dtype=torch.int32) if used else None
    used_k = torch.tensor([10, 3, 6], dtype=torch.int32) if used else None
    max_q, max_k = 9, 8  # clamp segment 2's queries (11 or 13) and segment 0's keys (10)
    out = rk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, 0.3, q_rows=q_rows, kv_rows=kv_rows,
                              seqused_q=used_q, seqused_k=used_k, backend=backend)
    reference, covered = used_reference(q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, 0.3,
                                        q_rows, kv_rows)
    torch.testing.assert_close(out[covered].double(), reference[covered], atol=1e-5, rtol=0)
    if not used:  # without seqused the uncovered rows (queries past max_seqlen_q too) are zero
        uncovered = torch.ones(20, dtype=torch.bool)
        uncovered[covered] = False
        assert uncovered.any() and not out[uncovered].any()


def test_varlen_attention_used_table_entries_may_name_missing_rows():
    """One table for every step: the entries past a segment's used length are not read (the packed
    path's q has only the live rows, the shared table names all of them)."""
    q, k, v = torch.randn(3, 1, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    table = torch.tensor([0, 1, 5, 2, 4, 3])  # rows 5, 4, 3 do not exist in q
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    used = torch.tensor([2, 1], dtype=torch.int32)
    out = rk.varlen_attention(q, k, v, cu, cu, 3, 3, q_rows=table, kv_rows=table, seqused_q=used,
                              seqused_k=used)
    reference, covered = used_reference(q, k, v, cu, cu, used, used, 3, 3, 8 ** -0.5, table, table)
    torch.testing.assert_close(out[covered].double(), reference[covered])
    with pytest.raises(ValueError, match="q_rows: entries must index"):
        rk.varlen_attention(q, k, v, cu, cu, 3, 3, q_rows=table, kv_rows=table,
                            seqused_q=torch.tensor([3, 1], dtype=torch.int32), seqused_k=used)



@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_layer_norm_live_rows(backend):
    """With num_rows, the rows below it are the LayerNorm (of x + residual) (that the triton kernel
    writes nothing past it: test_live_rows_cost)."""
    if rk.unavailable_reason(backend):
        pytest.skip(rk.unavailable_reason(backend))
    x, residual, weight, bias = torch.randn(70, 24), torch.randn(70, 24), torch.randn(24), torch.randn(24)
    for live in (0, 1, 33, 70, 99):
        out, summed = rk.layer_norm(x, weight, bias, 1e-6, residual=residual,
                                    num_rows=torch.tensor([live]), backend=backend)
        torch.testing.assert_close(summed[:live], (x + residual)[:live])
        torch.testing.assert_close(out[:live], F.layer_norm(x + residual, (24,), weight, bias, 1e-6)[:live])
    with pytest.raises(ValueError, match="num_rows: expected 1 element"):
        rk.layer_norm(x, weight, bias, num_rows=torch.tensor([1, 2]), backend=backend)
    with pytest.raises(ValueError, match="x: with num_rows expected"):
        rk.layer_norm(x[None], weight, bias, num_rows=torch.tensor([1]), backend=backend)
