"""Edge-RecViT and the recursive block: backends agree, losses equal hand computation, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import recvit
from recvit.models.layers import Block
from test_ops import PROFILES, random_depths

SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, num_heads=2)


def small_model(**overrides):
    return recvit.create_model("edge_recvit_tiny", **{**SMALL, **overrides}).eval()


@pytest.mark.parametrize("name,dim", [("edge_recvit_tiny", 192), ("edge_recvit_small", 384),
                                      ("edge_recvit_base", 768)])
def test_factories_build_the_paper_scales(name, dim):
    model = recvit.create_model(name, img_size=32, patch_size=16, num_classes=5)
    assert model.embed_dim == dim and model.num_steps == 12
    assert model.recursion.head_layer.attn.num_heads == dim // 64
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("batch", [1, 3])
def test_packed_equals_eager(kv, profile, batch):
    model = small_model()
    images = torch.randn(batch, 3, 32, 32)
    depths = random_depths(batch, model.num_tokens, model.num_steps, profile)
    with torch.no_grad():
        eager = model(images, depths=depths, kv=kv, backend="eager")
        packed = model(images, depths=depths, kv=kv, backend="packed")
    torch.testing.assert_close(packed, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_kv_modes_differ_when_tokens_exit(kv):
    model = small_model()
    images = torch.randn(2, 3, 32, 32)
    depths = random_depths(2, model.num_tokens, model.num_steps)
    with torch.no_grad():
        other = "all" if kv == "active" else "active"
        assert not torch.allclose(model(images, depths=depths, kv=kv), model(images, depths=depths, kv=other))


def test_odd_token_counts_and_other_depth_counts():
    model = small_model(img_size=56, num_steps=5)  # 7x7 patches + [CLS] = 50 tokens
    assert model.num_tokens == 50
    images = torch.randn(2, 3, 56, 56)
    depths = random_depths(2, 50, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(images, depths=depths, backend="packed"),
                                   model(images, depths=depths, backend="eager"), atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_eager():
    model = small_model().train()
    images = torch.randn(2, 3, 32, 32)
    depths = random_depths(2, model.num_tokens, model.num_steps)
    grads = {}
    for backend in ("eager", "packed"):
        model.zero_grad()
        model(images, depths=depths, backend=backend).square().sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["eager"].keys() == grads["packed"].keys()
    for name in grads["eager"]:
        torch.testing.assert_close(grads["packed"][name], grads["eager"][name], atol=1e-5, rtol=1e-4)


def test_exited_tokens_keep_their_state():
    block = recvit.RecursiveBlock(16, 2, num_steps=4)
    x = torch.randn(1, 5, 16)
    depths = torch.tensor([[4, 1, 2, 1, 3]])
    for backend in ("eager", "packed"):
        out = block(x, depths, backend=backend)
        after_head = block.head_layer(x)
        torch.testing.assert_close(out[0, [1, 3]], after_head[0, [1, 3]], atol=1e-6, rtol=1e-5)


def test_recursive_block_semantics_by_hand():
    """Step l applies head / shared / tail to the tokens with depth >= l, attention over those only."""
    block = recvit.RecursiveBlock(16, 2, num_steps=4).eval()
    x = torch.randn(1, 4, 16)
    depths = torch.tensor([[4, 2, 3, 1]])
    expected = x.clone()
    for step, layer in enumerate([block.head_layer, block.shared_layer, block.shared_layer,
                                  block.tail_layer], start=1):
        active = [i for i in range(4) if depths[0, i] >= step]
        expected[0, active] = layer(expected[:, active])[0]
    with torch.no_grad():
        for backend in ("eager", "packed"):
            torch.testing.assert_close(block(x, depths, backend=backend), expected, atol=1e-6, rtol=1e-5)


def test_recursive_block_from_timm_style_blocks():
    blocks = [Block(16, 2) for _ in range(3)]
    block = recvit.RecursiveBlock.from_blocks(*blocks, num_steps=3)
    x = torch.randn(2, 6, 16)
    depths = torch.full((2, 6), 3)
    torch.testing.assert_close(block(x, depths), blocks[2](blocks[1](blocks[0](x))))
    assert block.head_layer.attn.qkv.weight.data_ptr() != blocks[0].attn.qkv.weight.data_ptr()


def test_recursive_block_from_blocks_keeps_an_mlp_width_off_a_whole_ratio_and_relu():
    """int(56 * (61 / 56)) is 60: the width is taken as it is, not through mlp_ratio."""
    blocks = [Block(56, 4, mlp_hidden_dim=61, mlp_activation="relu") for _ in range(3)]
    block = recvit.RecursiveBlock.from_blocks(*blocks, num_steps=3)
    assert block.shared_layer.mlp.fc1.out_features == 61 and block.tail_layer.mlp.activation == "relu"
    x = torch.randn(2, 6, 56)
    torch.testing.assert_close(block(x, torch.full((2, 6), 3)), blocks[2](blocks[1](blocks[0](x))))


def test_ranker_depths_and_cls():
    model = small_model()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32), return_aux=True)
    assert out.depths.shape == (3, model.num_tokens) and out.depths.dtype == torch.int64
    assert bool((out.depths[:, 0] == model.num_steps).all())
    assert torch.equal(out.depths[:, 1:], out.depth_probs[:, 1:].argmax(-1) + 1)
    torch.testing.assert_close(out.confidence, out.depth_probs.max(-1).values)
    torch.testing.assert_close(out.depth_probs, out.depth_logits.float().softmax(-1))
    assert out.logits.shape == (3, 10)


def test_backend_from_environment(monkeypatch):
    model = small_model()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(images, backend="eager")
        monkeypatch.setenv("RECVIT_BACKEND", "packed")
        torch.testing.assert_close(model(images), reference, atol=1e-5, rtol=1e-5)
        monkeypatch.setenv("RECVIT_BACKEND", "warp")
        with pytest.raises(ValueError, match="RECVIT_BACKEND"):
            model(images)


def test_losses_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])  # (1, 2 tokens, L=3)
    probs = logits.softmax(-1)
    depths = torch.tensor([[3, 1]])
    lse = [math.log(1 + math.e + math.e ** 2), math.log(3 * math.e)]
    assert recvit.stb_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)
    expected_e = probs.reshape(2, 3).mean(0)
    actual_a = torch.tensor([0.5, 0.0, 0.5])
    assert recvit.du_loss(probs, depths).item() == pytest.approx(3 * float((expected_e * actual_a).sum()),
                                                                 rel=1e-6)
    uniform = torch.full((1, 3, 3), 1 / 3)
    assert recvit.du_loss(uniform, torch.tensor([[1, 2, 3]])).item() == pytest.approx(1.0)
    class_logits = torch.tensor([[2.0, -1.0]])
    confidence = torch.tensor([[0.5, 0.7]])
    target = torch.tensor([0])
    scaled = class_logits * 0.6
    expected_cce = -F.log_softmax(scaled, -1)[0, 0]
    assert recvit.cce_loss(class_logits, confidence, target).item() == pytest.approx(expected_cce.item())


def test_loss_combination_and_ranker_gradient_through_cce():
    model = small_model().train()
    out = model(torch.randn(2, 3, 32, 32), return_aux=True, backend="packed")
    losses = recvit.EdgeRecViTLoss()(out, torch.tensor([1, 4]))
    combined = losses.cce + 1e-3 * losses.stb + 0.1 * losses.du
    torch.testing.assert_close(losses.total, combined)
    model.zero_grad()
    losses.cce.backward()
    assert model.ranker.fc1.weight.grad is not None
    assert float(model.ranker.fc1.weight.grad.abs().sum()) > 0
    assert float(model.ranker.fc2.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("images,match", [
    (torch.randn(3, 32, 32), "images: expected shape"),
    (torch.randn(1, 1, 32, 32), "images: expected shape"),
    (torch.randn(1, 3, 64, 64), "images: expected shape"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.long), "images: expected a floating"),
    (torch.randn(1, 3, 32, 32, dtype=torch.float64),
     r"images: dtype torch.float64 differs from the model's torch.float32: convert the images"),
    (torch.randn(0, 3, 32, 32), r"images: expected at least one image, got an empty batch \(0, 3, 32, 32\)"),
])
def test_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        small_model()(images)


def test_bad_depths_kv_backend_and_names():
    model = small_model()
    images = torch.randn(2, 3, 32, 32)
    n = model.num_tokens
    with pytest.raises(ValueError, match="depths: expected shape"):
        model(images, depths=torch.ones(2, n - 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"depths: values must lie in 1..12"):
        model(images, depths=torch.full((2, n), 13))
    with pytest.raises(ValueError, match=r"depths: values must lie in 1..12"):
        model(images, depths=torch.zeros(2, n, dtype=torch.long))
    with pytest.raises(ValueError, match="kv='some'"):
        model(images, kv="some")
    with pytest.raises(ValueError, match="backend='gpu'"):
        model(images, backend="gpu")
    with pytest.raises(ValueError, match="name='edge_recvit_huge'.*edge_recvit_base"):
        recvit.create_model("edge_recvit_huge")
    with pytest.raises(ValueError, match="num_steps"):
        recvit.RecursiveBlock(16, 2, num_steps=1)


@pytest.mark.parametrize("overrides,match", [
    ({"img_size": 8, "patch_size": 16}, r"patch_size=16: expected an int in 1..img_size=8"),
    ({"patch_size": 0}, r"patch_size=0: expected an integer >= 1"),
    ({"mlp_activation": "gelu_new"}, r"activation='gelu_new': expected one of \('gelu', 'relu'\)"),
    ({"mlp_hidden_dim": 0}, r"mlp_hidden_dim=0: expected a positive int"),
    ({"mlp_hidden_dim": 60.5}, r"mlp_hidden_dim=60.5: expected a positive int"),
])
def test_bad_patch_size_and_mlp_settings(overrides, match):
    with pytest.raises(ValueError, match=match):
        small_model(**overrides)


def test_img_size_off_the_patch_grid_drops_the_remainder_as_timm_does():
    model = small_model(img_size=30)  # patch 8: 3x3 patches from the first 24 pixel rows and columns
    images = torch.randn(2, 3, 30, 30)
    assert model.num_tokens == 10
    edited = images.clone()
    edited[..., 24:, :] = edited[..., :, 24:] = float("nan")  # pixels the convolution never reads
    with torch.no_grad():
        assert torch.equal(model(edited), model(images))


def test_float64_images_run_under_a_float64_model():
    model = small_model().double()
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("x,match", [
    (torch.randn(1, 5, 100), r"x: expected shape \(batch, tokens, 16\) for this block's dim=16, got \(1, 5, 100\)"),
    (torch.randn(0, 5, 16), r"x: expected at least one image and one token, got shape \(0, 5, 16\)"),
])
def test_recursive_block_bad_states(x, match):
    block = recvit.RecursiveBlock(16, 2, num_steps=4)
    with pytest.raises(ValueError, match=match):
        block(x, torch.ones(x.shape[:2], dtype=torch.long))


def test_loss_needs_the_aux_output():
    model = small_model()
    images, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    with pytest.raises(TypeError, match=r"output: expected the RecViTOutput of model\(images, return_aux=True\)"
                                        r".*got Tensor"):
        recvit.EdgeRecViTLoss()(model(images), target)
    mor = recvit.create_model("mor_vit_tiny", **SMALL)
    with pytest.raises(TypeError, match="MoRViTLoss"):
        recvit.EdgeRecViTLoss()(mor(images, return_aux=True), target)


@pytest.mark.parametrize("backend", ["eager", "packed"])
def test_cls_is_forced_to_full_depth_in_overrides(backend):
    """An override with [CLS] below L runs [CLS] at L, as the ranker's depths do: the result and the
    reported depths equal those of the override with column 0 set to L."""
    model = small_model()
    images = torch.randn(2, 3, 32, 32)
    depths = random_depths(2, model.num_tokens, model.num_steps)
    depths[:, 0] = 3
    forced = depths.clone()
    forced[:, 0] = model.num_steps
    with torch.no_grad():
        got = model(images, depths=depths, return_aux=True, backend=backend)
        expected = model(images, depths=forced, return_aux=True, backend=backend)
    assert torch.equal(got.depths, forced) and torch.equal(got.logits, expected.logits)
    assert int(depths[0, 0]) == 3  # the caller's tensor is not modified
