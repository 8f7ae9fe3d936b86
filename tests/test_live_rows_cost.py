"""Cost follows the live rows: on the sync-free static path the bytes each step writes scale with
M_l (the step's active rows), not with the static bound B*N; for Edge-RecViT and the early-exit
DeiT (L distinct blocks) alike.

Measure: the bytes written by each recursion step's kernels, traced on CPU tensors
(``launches.trace_launches(execute=True)``): an aten op writes its outputs (or what it mutates);
a Triton kernel writes what its ``tl.store`` calls store under their masks, counted in the
interpreter as it runs. A step is everything ``Block.forward_static`` launches for it. With
``kv="active"`` every store of a step is per live row (LayerNorm, QKV, attention, proj, the
LayerNorm with the residual, fc1 and fc2 written in place), so bytes_l = c * M_l exactly; with
``kv="all"`` the keys and values of every token (and their LayerNorm) add a fixed B*N part.
Before this path read M_l on the device, each step wrote about the same bytes whatever M_l.

The backward of a static-path training step (``launches.step_backward``) follows the live rows
too: bytes_l = fixed + c * M_l, the fixed part being the weight gradients, the zero rows past M_l of
each input gradient and autograd's merges over all rows; the token-wise GEMMs issue FLOPs for the
live row tiles only. The eager backward (and the triton one before it had its own kernels, which
reran the eager ops) writes and computes the same whatever M_l (``benchmarks/backward_cost.py``).
"""
import pytest
import torch

import recvit
import recvit_kernels as rk
from recvit.models.layers import Block

if rk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {rk.unavailable_reason('triton')}", allow_module_level=True)

from launches import step_backward, trace_launches  # noqa: E402

BATCH, NUM_STEPS, DIM = 2, 4, 64


MODELS = ["edge_recvit_tiny", "deit_tiny_early_exit"]  # one shared layer; L distinct blocks


def step_bytes(depths, kv, monkeypatch, name="edge_recvit_tiny"):
    """[bytes written by step 1, ..., step L] of one static-path forward of model ``name`` with these
    depths."""
    model = recvit.create_model(name, img_size=32, patch_size=8, num_classes=10,
                                embed_dim=DIM, num_heads=2, num_steps=NUM_STEPS).eval()
    model.recursion.static_shapes = True
    spans, original = [], Block.forward_static

    def forward_static(layer, rows, *args, **kwargs):
        first = len(trace.launches)
        result = original(layer, rows, *args, **kwargs)
        spans.append((first, len(trace.launches)))
        return result

    monkeypatch.setattr(Block, "forward_static", forward_static)
    with torch.no_grad(), trace_launches(execute=True) as trace:
        model(torch.randn(BATCH, 3, 32, 32), depths=depths, kv=kv, backend="triton")
    assert len(spans) == NUM_STEPS
    return [sum(launch.bytes_written for launch in trace.launches[a:b]) for a, b in spans]


def live_rows(depths):
    return [int((depths >= step).sum()) for step in range(1, NUM_STEPS + 1)]


DEPTHS = {
    "mixed": lambda: torch.tensor([[4, 1, 2, 3, 1, 1, 2, 4, 1, 3, 2, 1, 1, 4, 2, 1, 1],
                                   [4, 2, 1, 1, 3, 1, 1, 1, 2, 1, 4, 1, 3, 1, 1, 2, 1]]),
    "all_shallow": lambda: torch.ones(BATCH, 17, dtype=torch.int64).index_fill_(1, torch.tensor([0]), NUM_STEPS),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("profile", sorted(DEPTHS))
def test_static_step_bytes_are_proportional_to_live_rows(profile, name, monkeypatch):
    depths = DEPTHS[profile]()
    written, rows = step_bytes(depths, "active", monkeypatch, name), live_rows(depths)
    per_row = written[0] / rows[0]  # step 1: every row live
    assert per_row > 0
    for step, (bytes_, live) in enumerate(zip(written, rows), start=1):
        assert bytes_ == per_row * live, (step, written, rows)
    # with all depths 1 but [CLS], the steps after the first write B rows' worth, not B*N
    assert written[-1] * depths.numel() == written[0] * rows[-1]


@pytest.mark.parametrize("name", MODELS)
def test_static_step_bytes_with_all_keys(name, monkeypatch):
    """kv="all": a fixed part (LayerNorm of every row and its keys and values, B*N*(C + 2C)
    elements) plus a part proportional to M_l."""
    depths = DEPTHS["mixed"]()
    written, rows = step_bytes(depths, "all", monkeypatch, name), live_rows(depths)
    fixed = depths.numel() * 3 * DIM * 4  # fp32
    per_row = (written[0] - fixed) / rows[0]
    for step, (bytes_, live) in enumerate(zip(written, rows), start=1):
        assert bytes_ == fixed + per_row * live, (step, written, rows)


@pytest.mark.parametrize("live", [0, 1, 33, 70])
def test_kernels_store_only_live_rows(live):
    """Each kernel of the static path stores exactly the live rows' bytes (no zero tiles)."""
    x, residual, weight = torch.randn(70, 24), torch.randn(70, 24), torch.randn(24, 24)
    count = torch.tensor([live])
    with torch.no_grad(), trace_launches(execute=True) as trace:
        rk.layer_norm(x, weight[0], weight[1], 1e-6, residual=residual, num_rows=count, backend="triton")
        rk.prefix_linear(x, weight, weight[2], count, "gelu", residual, backend="triton")
    stored = [launch.bytes_written for launch in trace.launches if launch.kind == "triton"]
    assert stored == [2 * live * 24 * 4, live * 24 * 4]

    depths = torch.randint(1, 4, (3, 17))
    layout = rk.depth_sort(depths, 3)
    q = torch.randn(51, 2, 16)
    with torch.no_grad(), trace_launches(execute=True) as trace:
        for step in range(1, 4):
            rk.varlen_attention(q, q, q, layout.all_rows_cu_seqlens(), layout.all_rows_cu_seqlens(), 17, 17,
                                q_rows=layout.image_order, kv_rows=layout.image_order,
                                seqused_q=layout.image_lengths[step - 1],
                                seqused_k=layout.image_lengths[step - 1], backend="triton")
    stored = [launch.bytes_written for launch in trace.launches if launch.kind == "triton"]
    assert stored == [int(m) * 2 * 16 * 4 for m in layout.step_rows]


def step_backward_costs(depths, backend, name="edge_recvit_tiny"):
    """[(bytes written, token-wise GEMM FLOPs, launches) of step l's backward for l = 1..L]."""
    model = recvit.create_model(name, img_size=32, patch_size=8, num_classes=10,
                                embed_dim=DIM, num_heads=2, num_steps=NUM_STEPS)
    layout = rk.depth_sort(depths, NUM_STEPS)
    rows = torch.randn(depths.numel(), DIM)
    costs = []
    for step in range(1, NUM_STEPS + 1):
        trace = step_backward(model.recursion.layer_for_step(step), rows, layout, step, "active", backend)
        flops = sum(launch.gemm_flops for launch in trace.launches
                    if launch.name in ("mm", "addmm") or launch.name.startswith("_prefix_linear"))
        costs.append((trace.bytes_written(), flops, trace.count()))
    return costs


@pytest.mark.parametrize("name", MODELS)
def test_static_step_backward_follows_live_rows(name):
    """Triton: bytes_l = fixed + c * M_l over four distinct M_l, GEMM FLOPs proportional to the live
    rows rounded up to the interpreter's 32-row tiles, fewer bytes than the eager backward at every
    step; eager: the same bytes and FLOPs at every step, whatever M_l."""
    depths = DEPTHS["mixed"]()
    rows = live_rows(depths)
    assert len(set(rows)) == NUM_STEPS
    triton, eager = step_backward_costs(depths, "triton", name), step_backward_costs(depths, "eager", name)
    written = [bytes_ for bytes_, _, _ in triton]
    per_row = (written[0] - written[-1]) / (rows[0] - rows[-1])
    fixed = written[0] - per_row * rows[0]
    assert per_row > 0 and fixed > 0
    for step, (bytes_, live) in enumerate(zip(written, rows), start=1):
        assert bytes_ == fixed + per_row * live, (step, written, rows)
    tiles = [-(-live // 32) for live in rows]
    flops = [f for _, f, _ in triton]
    assert all(f * tiles[0] == flops[0] * t for f, t in zip(flops, tiles)), (flops, tiles)
    assert len({cost for cost in eager}) == 1, eager
    assert all(bytes_ < eager[0][0] for bytes_ in written), (written, eager[0])
