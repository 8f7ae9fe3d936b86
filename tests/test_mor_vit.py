"""MoR-ViT: routing semantics, packed == eager, cached exit states, losses by hand, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import recvit
import recvit_kernels as rk
from recvit.models.losses import MoRViTLoss, balancing_loss, router_z_loss
from recvit.models.mor_vit import MoRViTOutput, kept_count

SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, num_heads=2, num_steps=4)
ROUTINGS = ["expert_choice", "token_choice"]


def small_model(**overrides):
    return recvit.create_model("mor_vit_tiny", **{**SMALL, **overrides}).eval()


def aux(model, images, **kwargs):
    return model(images, return_aux=True, **kwargs)


@pytest.mark.parametrize("name,dim", [("mor_vit_tiny", 192), ("mor_vit_small", 384), ("mor_vit_base", 768)])
def test_factories_build_the_paper_scales(name, dim):
    model = recvit.create_model(name, img_size=32, patch_size=16, num_classes=5)
    assert model.embed_dim == dim and model.num_steps == 12 and model.beta == 0.35
    assert model.routing == "expert_choice"
    assert model.recursion.head_layer.attn.num_heads == dim // 64
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_base_counts_give_the_papers_flops():
    """beta = 0.35 at N = 197: ~4.2 G multiply-adds, the paper's 4.1 G beside ViT-B's 17.6 G."""
    counts = recvit.create_model("mor_vit_base", num_classes=0).active_counts(197)
    assert counts[:4] == [197, 128, 83, 54] and counts[-1] == 1
    macs = sum(12 * n * 768 ** 2 + 2 * n * n * 768 for n in counts) + 196 * 768 * 768
    assert 4.0e9 < macs < 4.3e9


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("backend", ["eager", "packed"])
def test_forward_shapes(routing, backend):
    model = small_model(routing=routing)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert model(images, backend=backend).shape == (3, 10)
        out = aux(model, images, backend=backend)
    assert isinstance(out, MoRViTOutput) and isinstance(out, recvit.RecViTOutput)
    assert out.routing == routing
    assert out.depths.shape == (3, 17) and out.depths.dtype == torch.int64
    assert out.depths.min() >= 1 and out.depths.max() <= 4 and (out.depths[:, 0] == 4).all()
    assert out.confidence.shape == (3, 17) and out.features.shape == (3, 17, 32)
    assert out.depth_logits.shape == out.depth_probs.shape == out.scored.shape == (3, 17, 4)
    torch.testing.assert_close(out.depth_probs, torch.sigmoid(out.depth_logits))
    assert torch.isinf(out.depth_logits[~out.scored]).all()
    assert torch.isfinite(out.depth_logits[out.scored]).all()
    # confidence: the gate of the last step each token ran
    last = out.depth_logits.gather(-1, out.depths[..., None] - 1)[..., 0]
    torch.testing.assert_close(out.confidence, torch.sigmoid(last))


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("batch,img_size,beta", [(1, 32, 0.35), (3, 32, 0.5), (2, 56, 0.2), (2, 32, 0.9)])
def test_packed_equals_eager(routing, kv, batch, img_size, beta):
    model = small_model(routing=routing, img_size=img_size, beta=beta)  # 56: 7x7 patches, odd N = 50
    images = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad():
        eager = aux(model, images, kv=kv, backend="eager")
        packed = aux(model, images, kv=kv, backend="packed")
    assert torch.equal(packed.depths, eager.depths) and torch.equal(packed.scored, eager.scored)
    for field in ("logits", "features", "depth_logits", "confidence"):
        torch.testing.assert_close(getattr(packed, field), getattr(eager, field), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_packed_gradients_equal_eager(kv):
    model = small_model().train()
    images = torch.randn(2, 3, 32, 32)
    grads = {}
    for backend in ("eager", "packed"):
        model.zero_grad()
        out = aux(model, images, kv=kv, backend=backend)
        MoRViTLoss()(out, torch.tensor([1, 7])).total.backward()
        grads[backend] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["packed"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_router_only_training_equals_eager(routing):
    """Only the routers train (the layers and embedding frozen): the gates still need a gradient, so
    the packed steps must not write the rows in place (they once did, and backward failed)."""
    model = small_model(routing=routing).train()
    for name, p in model.named_parameters():
        p.requires_grad_("router" in name)
    images = torch.randn(2, 3, 32, 32)
    grads = {}
    for backend in ("eager", "packed"):
        model.zero_grad()
        out = aux(model, images, backend=backend)
        F.cross_entropy(out.logits, torch.tensor([1, 7])).backward()
        grads[backend] = model.router.weight.grad.clone()
    torch.testing.assert_close(grads["packed"], grads["eager"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_kv_modes_differ(kv):
    model = small_model()
    images = torch.randn(2, 3, 32, 32)
    other = "all" if kv == "active" else "active"
    with torch.no_grad():
        assert not torch.allclose(model(images, kv=kv), model(images, kv=other))


@pytest.mark.parametrize("backend", ["eager", "packed"])
def test_expert_choice_is_hierarchical_top_k_and_keeps_cls(backend):
    model = small_model(img_size=48, beta=0.4)  # 36 patches
    with torch.no_grad():
        out = aux(model, torch.randn(3, 3, 48, 48), backend=backend)
    depths, logits = out.depths, out.depth_logits
    assert (depths[:, 0] == model.num_steps).all()
    assert out.scored[:, :, 0].all()
    patches = 36
    for step in range(2, model.num_steps + 1):
        candidates, kept = depths >= step - 1, depths >= step
        assert torch.equal(out.scored[:, :, step - 1], candidates)
        assert not (kept & ~candidates).any()  # hierarchical: a subset of the previous step's tokens
        patches = kept_count(patches, 0.4)
        assert (kept[:, 1:].sum(1) == patches).all()  # the beta fraction, per image
        for b in range(3):  # every kept patch scores at least as high as every rejected candidate
            z = logits[b, 1:, step - 1]
            rejected = candidates[b, 1:] & ~kept[b, 1:]
            if kept[b, 1:].any() and rejected.any():
                assert z[kept[b, 1:]].min() >= z[rejected].max()


@pytest.mark.parametrize("backend", ["eager", "packed"])
@pytest.mark.parametrize("beta", [0.1, 0.35, 0.5, 0.9])
def test_beta_fraction_with_ties(backend, beta):
    """All scores tied: exactly floor((1 - beta) * n) patches are kept, the lowest token indices."""
    model = small_model(beta=beta)
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.bias.fill_(0.3)
        out = aux(model, torch.randn(2, 3, 32, 32), backend=backend)
    patches, expected = 16, torch.ones(16, dtype=torch.int64)
    for _ in range(2, model.num_steps + 1):
        patches = kept_count(patches, beta)
        expected[:patches] += 1
    assert torch.equal(out.depths[:, 1:], expected.expand(2, -1))
    assert (out.depths[:, 0] == 4).all()


def test_kept_count_is_exact_in_floating_point():
    assert kept_count(10, 0.3) == 7 and kept_count(10, 0.7) == 3 and kept_count(10, 0.9) == 1
    assert kept_count(196, 0.5) == 98 and kept_count(1, 0.5) == 0 and kept_count(0, 0.2) == 0


@pytest.mark.parametrize("backend", ["eager", "packed"])
@pytest.mark.parametrize("kv", ["active", "all"])
def test_exited_tokens_keep_their_cached_pre_router_state(backend, kv):
    """A token that exits at step 2 keeps its state after step 1; a token that exits at step 3 its
    state after step 2, computed here by hand from h <- h + g * (layer(h) - h)."""
    model = small_model(beta=0.5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = aux(model, images, kv=kv, backend=backend)
        tokens = model.embed(images)
        router = model.router

        def gated(step, x, mask):
            gate = torch.sigmoid(x @ router.weight[step - 1] + router.bias[step - 1])[..., None]
            return x + gate * (model.recursion.layer_for_step(step)(x, mask) - x)

        after1 = gated(1, tokens, None)
        active2 = out.depths >= 2
        mask2 = active2 if kv == "active" else None
        after2 = torch.where(active2[..., None], gated(2, after1, mask2), after1)
    one, two = out.depths == 1, out.depths == 2
    assert one.any() and two.any()
    torch.testing.assert_close(out.features[one], model.norm(after1)[one], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.features[two], model.norm(after2)[two], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "packed"])
def test_token_choice_is_the_recursive_block_with_router_depths(backend):
    model = small_model(routing="token_choice")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = aux(model, images, backend=backend)
        tokens = model.embed(images)
        logits = model.router(tokens)
        depths = logits.argmax(-1) + 1
        depths[:, 0] = 4
        gate = torch.sigmoid(logits.gather(-1, depths[..., None] - 1))
        expected = tokens
        for step in range(1, 5):  # h <- h + g * (layer(h) - h) at every step the token runs
            active = depths >= step
            updated = model.recursion.layer_for_step(step)(expected, active)
            expected = torch.where(active[..., None], expected + gate * (updated - expected), expected)
        forced = torch.randint(1, 5, (2, 17))
        overridden = aux(model, images, depths=forced, backend=backend)
    assert torch.equal(out.depths, depths)
    torch.testing.assert_close(out.depth_logits, logits)
    torch.testing.assert_close(out.features, model.norm(expected), atol=1e-5, rtol=1e-5)
    assert torch.equal(overridden.depths, forced)


def _output(routing, depths, logits, scored):
    logits = logits.masked_fill(~scored, -math.inf)
    return MoRViTOutput(torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor(depths), None, logits,
                        torch.sigmoid(logits), None, scored, routing)


def test_expert_choice_losses_by_hand():
    # [CLS] (depth 3), patch a exits at step 2 (depth 1), patch b at step 3 (depth 2); L = 3.
    z = torch.tensor([[[0.1, 0.2, 0.3], [0.5, -1.0, 9.0], [-0.4, 1.5, 0.7]]])
    scored = torch.tensor([[[True, True, True], [True, True, False], [True, True, True]]])
    out = _output("expert_choice", [[3, 1, 2]], z, scored)
    def sig(v):
        return 1 / (1 + math.exp(-v))

    z_expected = (0.5 ** 2 + 1.0 ** 2 + 0.4 ** 2 + 1.5 ** 2 + 0.7 ** 2) / 5
    # ranked: a at step 2 (exits: 0), b at step 2 (kept: 1), b at step 3 (exits: 0)
    bce = (-math.log(1 - sig(-1.0)) - math.log(sig(1.5)) - math.log(1 - sig(0.7))) / 3
    assert router_z_loss(out).item() == pytest.approx(z_expected, rel=1e-6)
    assert balancing_loss(out).item() == pytest.approx(bce, rel=1e-6)
    target = torch.tensor([0])
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(-1.0) + math.exp(0.5)))
    with torch.no_grad():  # hand-made outputs carry no gradients: the loss refuses them where gradients are on
        losses = MoRViTLoss(lambda_z=0.01, lambda_balance=0.5)(out, target)
    assert losses.ce.item() == pytest.approx(ce, rel=1e-6)
    assert losses.total.item() == pytest.approx(ce + 0.01 * z_expected + 0.5 * bce, rel=1e-6)


def test_token_choice_losses_by_hand():
    z = torch.tensor([[[0.0, 0.0, 5.0], [1.0, -2.0, 0.0], [0.3, 0.6, -0.1]]])
    out = _output("token_choice", [[3, 1, 2]], z, torch.ones(1, 3, 3, dtype=torch.bool))
    lse = [math.log(sum(math.exp(v) for v in row)) for row in z[0, 1:].tolist()]
    assert router_z_loss(out).item() == pytest.approx(sum(v * v for v in lse) / 2, rel=1e-6)
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in z[0, 1:].tolist()]
    prefs = [[s / sum(row) for s in row] for row in sig]
    mean_pref = [(prefs[0][l] + prefs[1][l]) / 2 for l in range(3)]
    share = [0.5, 0.5, 0.0]  # patch depths 1 and 2
    expected = 3 * sum(p * a for p, a in zip(mean_pref, share))
    assert balancing_loss(out).item() == pytest.approx(expected, rel=1e-6)
    everywhere = torch.ones(1, 4, 3, dtype=torch.bool)
    uniform = _output("token_choice", [[3, 1, 2, 3]], torch.zeros(1, 4, 3), everywhere)
    assert balancing_loss(uniform).item() == pytest.approx(1.0)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("backend", ["eager", "packed"])
@pytest.mark.parametrize("kv", ["active", "all"])
def test_gradients_reach_the_routers_through_the_task_loss(routing, backend, kv):
    """Expert choice: every step's router gates that step, so all L get gradient. Token choice:
    router d gates the tokens of depth d; a depth-1 token's update reaches [CLS] only as a frozen key
    (kv="all"), so with kv="active" the depth-1 router gets none from the task loss."""
    model = small_model(routing=routing).train()
    out = aux(model, torch.randn(2, 3, 32, 32), kv=kv, backend=backend)
    F.cross_entropy(out.logits, torch.tensor([3, 4])).backward()
    grad = model.router.weight.grad.abs().sum(1)
    if routing == "expert_choice":
        assert (grad > 0).all()
        return
    used = set(out.depths[:, 1:].flatten().tolist())
    assert 1 in used and len(used) > 2
    for depth in range(1, 5):
        reaches = depth in used and (depth > 1 or kv == "all") or depth == 4  # [CLS] has depth 4
        assert (grad[depth - 1] > 0) == reaches, depth


@pytest.mark.parametrize("beta", [0, 1, -0.2, 1.5, "0.5", True])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        small_model(beta=beta)


def test_bad_routing_depths_images_and_loss_input():
    with pytest.raises(ValueError, match="routing"):
        small_model(routing="top_k")
    model = small_model()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="depths"):
        model(images, depths=torch.full((2, 17), 4))
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="kv"):
        model(images, kv="none")
    with pytest.raises(ValueError, match="backend"):
        model(images, backend="fast")
    token = small_model(routing="token_choice")
    with pytest.raises(ValueError, match="depths"):
        token(images, depths=torch.full((2, 17), 5))
    edge = recvit.create_model("edge_recvit_tiny", **{**SMALL}).eval()
    with torch.no_grad(), pytest.raises(TypeError, match="output"):
        MoRViTLoss()(edge(images, return_aux=True), torch.tensor([0, 1]))


@pytest.mark.parametrize("kv", ["active", "all"])
def test_token_choice_sync_free_path_equals_eager(kv, monkeypatch):
    model = small_model(routing="token_choice")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(images, kv=kv, backend="eager")
        monkeypatch.setattr(model.recursion, "static_shapes", True)
        static = model(images, kv=kv, backend="packed")
    torch.testing.assert_close(static, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_triton_under_autocast_matches_eager(routing):
    """Under autocast the triton backend runs the recursion in autocast's dtype (fp16 here, the
    interpreter has no bf16): the same depths as eager under autocast, logits and the routers'
    gradient within 16-bit rounding (its residual stream is 16-bit, autocast's stays fp32)."""
    if rk.unavailable_reason("triton") is not None:
        pytest.skip(rk.unavailable_reason("triton"))
    model = small_model(routing=routing).train()
    images = torch.randn(2, 3, 32, 32)
    results = {}
    for backend in ("triton", "eager"):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.float16):
            out = model(images, return_aux=True, backend=backend)
        out.logits.float().sum().backward()
        results[backend] = out.logits.float().detach(), out.depths, model.router.weight.grad.clone()
    (logits, depths, grad), (eager_logits, eager_depths, eager_grad) = results["triton"], results["eager"]
    assert torch.equal(depths, eager_depths)
    torch.testing.assert_close(logits, eager_logits, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(grad, eager_grad, atol=2e-2 * float(eager_grad.abs().max()), rtol=0)
