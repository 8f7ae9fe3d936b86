"""Launch budget: kernels launched per forward by Edge-RecViT-Base and the early-exit DeiT-B
(``recvit.from_vit`` of the DeiT, names prefixed ``early-exit``) vs the dense DeiT-B of
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


@pytest.mark.parametrize("model", ["", "early-exit "], ids=["edge-recvit", "early-exit"])
@pytest.mark.parametrize("kv", ["active", "all"])
def test_static_path_within_budget_and_sync_free(traces, kv, model):
    dense = traces["dense DeiT-B"].count()
    trace = traces[f"{model}static kv={kv}"]
    assert trace.syncs == 0
    assert trace.count() <= STATIC_BUDGET * dense, (trace.count(), dense)


@pytest.mark.parametrize("model", ["", "early-exit "], ids=["edge-recvit", "early-exit"])
@pytest.mark.parametrize("kv", ["active", "all"])
def test_packed_path_within_budget(traces, kv, model):
    dense = traces["dense DeiT-B"].count()
    trace = traces[f"{model}packed kv={kv}"]
    assert trace.syncs == 1  # the per-step row counts, read once per forward
    assert trace.count() <= PACKED_BUDGET * dense, (trace.count(), dense)


@pytest.mark.parametrize("model", ["", "early-exit "], ids=["edge-recvit", "early-exit"])
@pytest.mark.parametrize("path", ["static", "packed"])
def test_no_aten_work_per_step(traces, path, model):
    """Index tables, masks and merges are built once per forward: every aten op the recursion runs
    per step is one of the layer's own (GEMMs on the packed path), never table or mask work."""
    per_step_allowed = {"addmm", "mm"} if path == "packed" else set()
    aten = collections.Counter(launch.name for launch in traces[f"{model}{path} kv=active"].launches
                               if launch.kind == "aten")
    per_step = {name for name, count in aten.items() if count >= NUM_STEPS} - per_step_allowed
    assert not per_step, aten


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_layer_norm_launches_no_aten_op(dtype):
    """The cuda LayerNorm reads half-precision weight and bias as they are and the live count on
    the device: a call launches its own kernel and no aten op (it cast weight and bias to fp32 on
    every call: 48 launches per bf16 forward). The extension's kernel is invisible to the tracer;
    the aten ops inside the binding are not, as the strided x it must copy shows."""
    assert rk.unavailable_reason("cuda") is None, rk.unavailable_reason("cuda")
    wide = torch.randn(64, 384, device="cuda", dtype=dtype)
    x, weight, bias = wide[:, :192].contiguous(), wide[0, :192].clone(), wide[1, :192].clone()
    count = torch.tensor([40], device="cuda", dtype=torch.int32)
    with torch.no_grad():
        with trace_launches() as trace:
            rk.layer_norm(x, weight, bias, 1e-6, residual=x, num_rows=count, backend="cuda")
            rk.layer_norm(x, weight, None, 1e-6, backend="cuda")
        assert trace.count() == 0 and trace.syncs == 0, trace.launches
        with trace_launches() as copying:
            rk.layer_norm(wide[:, :192], weight, bias, 1e-6, num_rows=count, backend="cuda")
        assert copying.count() == 1, copying.launches
