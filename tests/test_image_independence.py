"""Images in a batch are independent: a non-finite pixel reaches its own image's outputs only. In a
batch of five, image 0 gets a NaN pixel, image 1 an inf, image 2 a 1e38 (which overflows in the patch
embedding); on every backend here (triton through the interpreter), both kv modes, the packed and the
sync-free paths, Edge-RecViT and MoR-ViT, the clean images' logits, and in training their input
gradients, equal a clean run's bit for bit (the same depths give the same layout, so the same
operations run on their rows).

Training uses the recipe's loss with given depths: DU averages the depth histogram over the batch,
so with the ranker's depths image 0's (arbitrary) depths would rightly change the others' gradient.
"""
import pytest
import torch

import recvit
import recvit_kernels as rk
from test_ops import random_depths

# The Triton interpreter computes with NumPy, which warns about the NaN and inf it meets.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, num_heads=2, num_steps=4)
BACKENDS = ["eager", "packed", pytest.param("triton", marks=pytest.mark.skipif(
    rk.unavailable_reason("triton") is not None, reason=str(rk.unavailable_reason("triton"))))]
POISONS = (float("nan"), float("inf"), 1e38)  # images 0, 1, 2; images 3 and 4 stay clean
CLEAN = len(POISONS)


def poisoned(images):
    bad = images.clone()
    for image, value in enumerate(POISONS):
        bad[image, 1, 5, 7] = value
    return bad


def assert_training_isolated(model, images, loss_fn, **kwargs):
    """Logits and d loss / d images of a training forward on the poisoned batch: the clean images'
    equal the clean batch's."""
    def run(batch):
        batch = batch.clone().requires_grad_()
        out = model(batch, return_aux=True, **kwargs)
        (grad,) = torch.autograd.grad(loss_fn(out), batch)
        return out.logits.detach(), grad

    (clean_logits, clean_grad), (logits, grad) = run(images), run(poisoned(images))
    assert_clean_images_unchanged(logits, clean_logits)
    assert_clean_images_unchanged(grad, clean_grad)


def assert_clean_images_unchanged(ours, clean):
    """The clean images as in the clean run; the NaN pixel reaches image 0's outputs (what inf and
    1e38 give their images depends on the backend's LayerNorm: inf, NaN or a finite value)."""
    assert torch.isnan(ours[0]).any()
    assert torch.isfinite(ours[CLEAN:]).all()
    assert torch.equal(ours[CLEAN:], clean[CLEAN:])


@pytest.fixture(scope="module")
def edge_setup():
    torch.manual_seed(0)
    model = recvit.create_model("edge_recvit_tiny", **SMALL).train()
    images = torch.randn(5, 3, 32, 32)
    depths = random_depths(5, model.num_tokens, model.num_steps)
    return model, images, depths, torch.tensor([1, 4, 7, 2, 9])


@pytest.mark.parametrize("static_shapes", [False, True], ids=["packed-path", "sync-free"])
@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_recvit_inference(edge_setup, backend, kv, static_shapes):
    """Logits with the ranker's own depths (the poisoned images' change: the layout differs)."""
    model, images, _, _ = edge_setup
    model.recursion.static_shapes = static_shapes
    with torch.no_grad():
        clean = model(images, kv=kv, backend=backend)
        ours = model(poisoned(images), kv=kv, backend=backend)
    assert torch.isnan(ours[0]).any()
    assert torch.isfinite(ours[CLEAN:]).all()
    torch.testing.assert_close(ours[CLEAN:], clean[CLEAN:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("static_shapes", [False, True], ids=["packed-path", "sync-free"])
@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_recvit_training(edge_setup, backend, kv, static_shapes):
    model, images, depths, targets = edge_setup
    model.recursion.static_shapes = static_shapes
    loss = recvit.EdgeRecViTLoss(label_smoothing=0.1)
    assert_training_isolated(model, images, lambda out: loss(out, targets).total, depths=depths, kv=kv,
                             backend=backend)


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_mor_vit_training(routing, backend, kv):
    """MoR-ViT's routers pick per image: logits and input gradients of the others unchanged.
    Token choice takes given depths (its balancing loss averages the depth histogram)."""
    torch.manual_seed(0)
    model = recvit.create_model("mor_vit_tiny", routing=routing, **SMALL).train()
    images, targets = torch.randn(5, 3, 32, 32), torch.tensor([1, 4, 7, 2, 9])
    depths = random_depths(5, model.num_tokens, model.num_steps) if routing == "token_choice" else None
    loss = recvit.MoRViTLoss()
    assert_training_isolated(model, images, lambda out: loss(out, targets).total, depths=depths, kv=kv,
                             backend=backend)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_varlen_attention_padding_reads_no_other_segment(kv):
    """The op itself: a NaN row in segment 0 leaves the other segments' outputs and q/k/v gradients
    unchanged (eager's padding used to read row 0 and multiply it by a zero weight)."""
    layout = rk.depth_sort(random_depths(3, 17, 4), 4)
    starts, used = layout.all_rows_cu_seqlens(), layout.image_lengths[1]
    tables = dict(q_rows=layout.image_order, kv_rows=layout.image_order, seqused_q=used,
                  seqused_k=used if kv == "active" else None)
    qkv = torch.randn(3, 51, 2, 16)
    poisoned_qkv = qkv.clone()
    poisoned_qkv[:, layout.image_order[0]] = float("nan")  # a row of image 0

    def run(qkv):
        qkv = qkv.clone().requires_grad_()
        out = rk.varlen_attention(*qkv, starts, starts, 17, 17, backend="eager", **tables)
        (grad,) = torch.autograd.grad(out.sum(), qkv)
        return out.detach(), grad

    (clean_out, clean_grad), (out, grad) = run(qkv), run(poisoned_qkv)
    others = layout.image_order[17:]
    assert torch.isnan(out[layout.image_order[:17]]).any()
    assert torch.equal(out[others], clean_out[others])
    assert torch.equal(grad[:, others], clean_grad[:, others])
