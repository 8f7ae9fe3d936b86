"""Launch budget: kernels launched per forward by Edge-RecViT-Base vs the dense DeiT-B of
``recvit.bench``, traced on CPU tensors (see ``launches.py`` for what counts as a launch: aten ops
that run a kernel on a GPU, i.e. not views, allocations or scalar reads, plus Triton launches,
recorded by a fake launcher instead of run).

Budgets (issue 9): the sync-free static path at most 1.15x the dense model's launches, the packed
path at most 1.3x (it also makes one host sync, for the per-step row counts). The images are 64 px
(17 tokens): a launch count does not depend on the token count (``python tests/launches.py 1x224``
prints the same numbers at 224 px), and small images keep the real aten work on the CPU cheap.
"""
import collections

import torch

import pytest

import recvit_kernels as rk

if rk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {rk.unavailable_reason('triton')}", allow_module_level=True)

from launches import launch_counts, trace_launches  # noqa: E402  (imports the triton backend)

STATIC_BUDGET, PACKED_BUDGET = 1.15, 1.3
NUM_STEPS = 12


@pytest.fixture(scope="module")
def traces():
    return launch_counts(batch=1, img_size=64)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_static_path_within_budget_and_sync_free(traces, kv):
    dense = traces["dense DeiT-B"].count()
    trace = traces[f"static kv={kv}"]
    assert trace.syncs == 0
    assert trace.count() <= STATIC_BUDGET * dense, (trace.count(), dense)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_packed_path_within_budget(traces, kv):
    dense = traces["dense DeiT-B"].count()
    trace = traces[f"packed kv={kv}"]
    assert trace.syncs == 1  # the per-step row counts, read once per forward
    assert trace.count() <= PACKED_BUDGET * dense, (trace.count(), dense)


@pytest.mark.parametrize("path", ["static", "packed"])
def test_no_aten_work_per_step(traces, path):
    """Index tables, masks and merges are built once per forward: every aten op the recursion runs
    per step is one of the layer's own (GEMMs on the packed path), never table or mask work."""
    per_step_allowed = {"addmm", "mm"} if path == "packed" else set()
    aten = collections.Counter(launch.name for launch in traces[f"{path} kv=active"].launches
                               if launch.kind == "aten")
    per_step = {name for name, count in aten.items() if count >= NUM_STEPS} - per_step_allowed
    assert not per_step, aten


def test_cuda_layer_norm_casts_weights_once():
    """The cuda LayerNorm reads fp32 weights: a bf16 model's are cast on the first call only
    (they were cast on every call: 48 launches per forward), and again after they change."""
    from recvit_kernels.cuda.layer_norm import _FP32_COPIES, fp32_copy

    weight = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    with trace_launches() as trace:
        first, second = fp32_copy(weight), fp32_copy(weight)
    assert trace.count() == 1 and second is first
    torch.testing.assert_close(first, weight.float())
    with torch.no_grad():
        weight.mul_(2)
    assert fp32_copy(weight) is not first
    torch.testing.assert_close(fp32_copy(weight), weight.float())
    full = torch.randn(8)
    assert fp32_copy(full) is full and fp32_copy(None) is None
    key = id(weight)
    del weight
    assert key not in _FP32_COPIES
