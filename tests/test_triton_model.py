"""Edge-RecViT on the triton backend equals eager; the sync-free path; CUDA-graph capture."""
import pytest
import torch

import recvit
import recvit_kernels as rk
from recvit.models.graph import GraphedForward, compile_graph
from test_ops import PROFILES, random_depths
from tolerance import assert_flash_rule

pytest.importorskip("triton")
if rk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {rk.unavailable_reason('triton')}", allow_module_level=True)

SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, num_heads=2)  # N = 17, head_dim 32


def small_model(**overrides):
    return recvit.create_model("edge_recvit_tiny", **{**SMALL, **overrides}).eval()


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("batch,static_shapes", [(1, False), (1, True), (3, False), (3, True)],
                         ids=["batch1", "batch1-static", "batch3", "batch3-static"])
def test_triton_equals_eager(batch, static_shapes, profile, kv):
    """Packed prefix path, and the sync-free one (prefix GEMMs over all rows), vs eager."""
    model = small_model(num_steps=4)
    model.recursion.static_shapes = static_shapes
    images = torch.randn(batch, 3, 32, 32)
    depths = random_depths(batch, model.num_tokens, model.num_steps, profile)
    with torch.no_grad():
        eager = model(images, depths=depths, kv=kv, backend="eager")
        triton = model(images, depths=depths, kv=kv, backend="triton")
    torch.testing.assert_close(triton, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_sync_free_path_equals_eager_with_ranker_depths(kv):
    model = small_model(img_size=56)  # 50 tokens, 12 steps, depths from the ranker
    model.ranker.fc2.weight.data.normal_(0, 1.0)  # spread the ranker's depths over 1..12
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        depths = model(images, return_aux=True, backend="eager").depths
        assert depths.unique().numel() > 3
        eager = model(images, kv=kv, backend="eager")
        model.recursion.static_shapes = True
        triton = model(images, kv=kv, backend="triton")
    torch.testing.assert_close(triton, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_forward_static_is_forward_packed_on_the_live_rows(kv):
    """The first M rows equal the packed path's prefix; written in place (``out``), the rows past M
    are left exactly as they were."""
    block = recvit.RecursiveBlock(32, 1, num_steps=4)
    layout = rk.depth_sort(random_depths(2, 17, 4), 4)
    rows = torch.randn(34, 32)
    for step in range(1, 5):
        live = int(layout.step_rows[step - 1])
        layer = block.layer_for_step(step)
        with torch.no_grad():
            static = layer.forward_static(rows, layout, step, kv, "triton")
            packed = layer.forward_packed(rows, layout, step, live, kv, "triton")
            in_place = rows.clone()
            layer.forward_static(in_place, layout, step, kv, "triton", out=in_place)
        torch.testing.assert_close(static[:live], packed, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(in_place[:live], packed, atol=1e-5, rtol=1e-5)
        assert torch.equal(in_place[live:], rows[live:])


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("static_shapes", [False, True])
def test_gradients_equal_eager(static_shapes, kv):
    """Every parameter's gradient (the attention's through the Triton backward kernels)."""
    images = torch.randn(2, 3, 32, 32)
    depths = random_depths(2, 17, 4)
    grads = {}
    for backend in ("triton", "eager"):
        torch.manual_seed(3)
        model = small_model(num_steps=4).train()
        model.recursion.static_shapes = static_shapes
        model(images, depths=depths, kv=kv, backend=backend).logsumexp(-1).sum().backward()
        grads[backend] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["eager"].keys()
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["triton"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_graphed_forward_validates_inputs():
    graphed = GraphedForward(None, torch.zeros(2, 3, 32, 32), None, None)
    with pytest.raises(ValueError, match=r"images: .*shape \(2, 3, 32, 32\), got \(1, 3, 32, 32\)"):
        graphed(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="images: .*dtype torch.float32, got torch.float16"):
        graphed(torch.zeros(2, 3, 32, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="depths: the graph was captured without"):
        graphed(torch.zeros(2, 3, 32, 32), torch.ones(2, 17, dtype=torch.int64))
    with pytest.raises(TypeError, match="images: expected a torch.Tensor"):
        graphed([0.0])
    with_depths = GraphedForward(None, torch.zeros(2, 3, 32, 32), torch.ones(2, 17, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="depths: .*shape"):
        with_depths.check_inputs(torch.zeros(2, 3, 32, 32), torch.ones(2, 5, dtype=torch.int64))


def test_compile_graph_needs_cuda():
    with pytest.raises(ValueError, match="example_images: CUDA graphs need a CUDA tensor"):
        compile_graph(small_model(), torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------- GPU (skipped without CUDA)

def _low_precision_check(model, images, dtype, **kwargs):
    """Triton in ``dtype`` vs fp32 eager: error <= 2x eager-in-``dtype`` error + floor."""
    with torch.no_grad():
        reference = model.float()(images.float(), backend="eager", **kwargs).double()
        model = model.to(dtype)
        ours = model(images.to(dtype), backend="triton", **kwargs).double()
        theirs = model(images.to(dtype), backend="eager", **kwargs).double()
    assert_flash_rule(ours, theirs, reference, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("name,img_size", [("edge_recvit_tiny", 224), ("edge_recvit_base", 224),
                                           ("edge_recvit_small", 384)])
def test_gpu_model_equals_eager(name, img_size, static_shapes, dtype):
    model = recvit.create_model(name, img_size=img_size).cuda().eval()
    model.recursion.static_shapes = static_shapes
    images = torch.randn(4, 3, img_size, img_size, device="cuda")
    depths = random_depths(4, model.num_tokens, 12).cuda()
    for kv in ("active", "all"):
        _low_precision_check(model, images, dtype, depths=depths, kv=kv)


@pytest.mark.gpu
def test_gpu_forward_has_no_host_sync():
    model = recvit.create_model("edge_recvit_small").cuda().eval().half()
    model.recursion.static_shapes = True
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        model(images, backend="triton")  # compile the kernels first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for kv in ("active", "all"):
                model(images, kv=kv, backend="triton")
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_static_path_base_batch64():
    """Edge-RecViT-B, bf16, batch 64: the sync-free path (prefix GEMMs) equals eager, and its
    forward makes no host sync."""
    model = recvit.create_model("edge_recvit_base").cuda().eval()
    model.recursion.static_shapes = True
    images = torch.randn(64, 3, 224, 224, device="cuda")
    depths = random_depths(64, model.num_tokens, 12).cuda()
    for kv in ("active", "all"):
        _low_precision_check(model, images, torch.bfloat16, depths=depths, kv=kv)
    images = images.bfloat16()  # the check left the model in bf16
    calls = [dict(kv=kv, depths=given) for kv in ("active", "all") for given in (None, depths)]
    with torch.no_grad():
        for call in calls:  # compile every kernel variant first
            model(images, backend="triton", **call)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls:
                model(images, backend="triton", **call)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("with_depths", [False, True])
def test_gpu_graph_replay_equals_eager(with_depths):
    model = recvit.create_model("edge_recvit_tiny").cuda().eval()
    images = torch.randn(2, 3, 224, 224, device="cuda")
    depths = random_depths(2, model.num_tokens, 12).cuda() if with_depths else None
    graphed = compile_graph(model, images, depths)
    assert model.recursion.static_shapes is False
    for _ in range(3):
        new_images = torch.randn_like(images)
        new_depths = random_depths(2, model.num_tokens, 12).cuda() if with_depths else None
        with torch.no_grad():
            expected = model(new_images, depths=new_depths, backend="eager")
        torch.testing.assert_close(graphed(new_images, new_depths), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="images: the graph was captured for shape"):
        graphed(torch.randn(3, 3, 224, 224, device="cuda"), depths)
