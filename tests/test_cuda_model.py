"""A whole Edge-RecViT forward on the cuda backend (GPU only): every op runs a cuda kernel (nothing
handed to another backend), the result equals eager under the tolerance rule on the packed and the
sync-free path, the sync-free path makes no host sync, and the whole forward graph-captures."""
import copy
import logging

import pytest
import torch

import recvit
import recvit_kernels as rk
from recvit.models.graph import compile_graph
from recvit_kernels import _backend
from test_ops import PROFILES, random_depths
from tolerance import assert_flash_rule

FLOOR = 2e-2  # as the triton model tests: logits after 12 steps in half precision


@pytest.fixture(scope="module")
def cuda_backend():
    reason = rk.unavailable_reason("cuda")
    assert reason is None, f"the cuda backend did not load on this GPU machine: {reason}"


def check_low_precision(model, images, dtype, **kwargs):
    """The cuda backend in ``dtype`` vs fp32 eager: error <= 2x eager-in-``dtype`` error + floor."""
    low = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        reference = model(images, backend="eager", **kwargs).double()
        ours = low(images.to(dtype), backend="cuda", **kwargs).double()
        theirs = low(images.to(dtype), backend="eager", **kwargs).double()
    assert_flash_rule(ours, theirs, reference, FLOOR)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("name,img_size", [("edge_recvit_tiny", 224), ("edge_recvit_base", 224),
                                           ("edge_recvit_small", 384)])
def test_cuda_model_runs_alone_and_equals_eager(cuda_backend, name, img_size, static_shapes, dtype,
                                                caplog, monkeypatch):
    monkeypatch.setattr(_backend, "_logged_fallbacks", set())
    model = recvit.create_model(name, img_size=img_size).cuda().eval()
    model.recursion.static_shapes = static_shapes
    images = torch.randn(4, 3, img_size, img_size, device="cuda")
    depths = random_depths(4, model.num_tokens, 12).cuda()
    with caplog.at_level(logging.INFO, logger="recvit_kernels"):
        for kv in ("active", "all"):
            check_low_precision(model, images, dtype, depths=depths, kv=kv)
    assert "falling back" not in caplog.text, caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_model_depth_profiles(cuda_backend, profile, batch):
    """All tokens exiting at once, every token deep, one token left, batch 1, on the sync-free path."""
    model = recvit.create_model("edge_recvit_tiny").cuda().eval()
    model.recursion.static_shapes = True
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    depths = random_depths(batch, model.num_tokens, 12, profile).cuda()
    for kv in ("active", "all"):
        check_low_precision(model, images, torch.float16, depths=depths, kv=kv)


@pytest.mark.gpu
def test_cuda_static_forward_has_no_host_sync(cuda_backend):
    model = recvit.create_model("edge_recvit_small").cuda().eval().half()
    model.recursion.static_shapes = True
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        model(images, backend="cuda")  # builds nothing new later: cuBLAS handles, JIT load
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for kv in ("active", "all"):
                model(images, kv=kv, backend="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_graph_of_the_whole_forward(cuda_backend, dtype):
    """compile_graph(backend="cuda") captures ranker-free forwards with given depths; replays with
    new images and depths equal eager under the tolerance rule."""
    model = recvit.create_model("edge_recvit_tiny").cuda().eval()
    low = copy.deepcopy(model).to(dtype)
    images = torch.randn(2, 3, 224, 224, device="cuda")
    depths = random_depths(2, model.num_tokens, 12).cuda()
    graphed = compile_graph(low, images.to(dtype), depths, backend="cuda")
    for profile in ("random", "all_one", "single"):
        new_images = torch.randn_like(images)
        depths.copy_(random_depths(2, model.num_tokens, 12, profile))
        with torch.no_grad():
            reference = model(new_images, depths=depths, backend="eager").double()
            theirs = low(new_images.to(dtype), depths=depths, backend="eager").double()
        ours = graphed(new_images.to(dtype), depths).double()
        assert_flash_rule(ours, theirs, reference, FLOOR)
