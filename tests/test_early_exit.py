"""Early-exit DeiT/ViT: from_vit and DeiT checkpoints (timm key names), equal to the dense model at
depth L on every backend; ranker-driven depths, losses and the training recipe."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import recvit
import recvit_kernels as rk
from deit_reference import GluMlp, SwiGLU, SwiGLUPacked, TimmGELU, VisionTransformer
from recvit.training import train
from recvit.checkpoint import load_checkpoint
from recvit.training.data import make_shapes_dataset
from test_checkpoint import to_hf
from test_ops import random_depths

SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, num_heads=2)  # 17 tokens, head_dim 32
BACKENDS = ["eager", "packed", "triton"]


def deit(depth=4, **overrides):
    """The test-written DeiT (timm's structure and key names) with random LayerNorm weights too."""
    torch.manual_seed(1)
    model = VisionTransformer(**{**SMALL, "depth": depth, **overrides}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model


def full_depths(model, batch):
    return torch.full((batch, model.num_tokens), model.num_steps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv", ["active", "all"])
def test_from_vit_at_full_depth_equals_the_dense_deit(backend, kv):
    if rk.unavailable_reason(backend) is not None:
        pytest.skip(f"{backend} backend unavailable: {rk.unavailable_reason(backend)}")
    source = deit()
    model = recvit.from_vit(source, kv=kv)
    assert isinstance(model, recvit.EarlyExitViT) and model.num_steps == 4 and not model.training
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = source(images)
        got = model(images, depths=full_depths(model, 3), backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_from_vit_copies_every_weight_under_timm_names():
    source = deit()
    model = recvit.from_vit(source)
    state = model.state_dict()
    assert sorted(state) == sorted([*source.state_dict(), "ranker.fc1.weight", "ranker.fc2.weight"])
    assert all(torch.equal(value, state[key]) for key, value in source.state_dict().items())
    assert model.blocks[0].attn.qkv.weight.data_ptr() != source.blocks[0].attn.qkv.weight.data_ptr()


def test_deit_checkpoint_loads_into_the_registered_model_unchanged(tmp_path):
    source = deit(depth=12, embed_dim=192, num_heads=3)
    torch.save(source.state_dict(), tmp_path / "deit.pth")
    model = recvit.create_model("deit_tiny_early_exit", **{**SMALL, "embed_dim": 192, "num_heads": 3}).eval()
    loaded = load_checkpoint(model, tmp_path / "deit.pth")
    assert loaded.missing == ["ranker.fc1.weight", "ranker.fc2.weight"] and loaded.unused == []
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images, depths=full_depths(model, 2), backend="packed"),
                                   source(images), atol=1e-5, rtol=1e-5)


class HFViT(nn.Module):
    """What from_vit reads of a Hugging Face ViTForImageClassification: its ``config`` and its state
    dict's keys (``vit.embeddings.*``, ``vit.encoder.layer.{i}.*`` with q, k, v split, ``classifier``)."""

    def __init__(self, source, hidden_act="gelu"):
        super().__init__()
        self.classifier = source.head
        first = source.blocks[0]
        self.config = SimpleNamespace(model_type="vit", hidden_act=hidden_act, image_size=32, patch_size=8,
                                      num_channels=3, hidden_size=source.cls_token.shape[-1],
                                      num_attention_heads=first.attn.num_heads,
                                      intermediate_size=first.mlp.fc1.out_features,
                                      num_hidden_layers=len(source.blocks), qkv_bias=True, layer_norm_eps=1e-6)
        self._hf_state = to_hf(source.state_dict())

    def state_dict(self, *args, **kwargs):
        return dict(self._hf_state)


def test_from_hugging_face_vit_equals_the_dense_deit():
    source = deit()
    model = recvit.from_vit(HFViT(source))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images, depths=full_depths(model, 2)), source(images),
                                   atol=1e-5, rtol=1e-5)


# 112 * (61 / 112) = 60.99..: a width read back through mlp_ratio = hidden / dim builds 60 units
ODD_WIDTH = dict(embed_dim=112, num_heads=7, mlp_hidden_dim=61)  # head_dim 16
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "timm's gelu": TimmGELU}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hf,activation", [(False, "gelu"), (False, "relu"), (False, "timm's gelu"), (True, "gelu"),
                                           (True, "relu")], ids=["timm-gelu", "timm-relu", "timm-timms_gelu",
                                                                 "hf-gelu", "hf-relu"])
def test_odd_mlp_width_and_relu_convert_exactly(hf, activation, backend):
    """A ViT whose MLP width is no int(dim * ratio) of its width, with GELU (torch's, or timm's own,
    which timm's act_layer="gelu" builds) or ReLU (HF hidden_act "relu"), converts to the same
    function: from_vit, and a state dict into a registered model."""
    if rk.unavailable_reason(backend) is not None:
        pytest.skip(f"{backend} backend unavailable: {rk.unavailable_reason(backend)}")
    source = deit(act_layer=ACTIVATIONS[activation], **ODD_WIDTH)
    activation = activation.removeprefix("timm's ")
    converted = recvit.from_vit(HFViT(source, hidden_act=activation) if hf else source)
    registered = recvit.create_model("deit_tiny_early_exit", **{**SMALL, **ODD_WIDTH}, num_steps=4,
                                     mlp_activation=activation).eval()
    load_checkpoint(registered, to_hf(source.state_dict()) if hf else source.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(images)
        for model in (converted, registered):
            mlp = model.blocks[3].mlp
            assert (mlp.fc1.out_features, mlp.activation) == (61, activation)
            torch.testing.assert_close(model(images, depths=full_depths(model, 2), backend=backend), expected,
                                       atol=1e-5, rtol=1e-5)


def test_from_vit_refuses_what_it_cannot_run():
    distilled = deit()
    distilled.dist_token = nn.Parameter(torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match="vit: a distillation token"):
        recvit.from_vit(distilled)
    pooled = deit()
    pooled.global_pool = "avg"
    with pytest.raises(ValueError, match="global_pool='avg'"):
        recvit.from_vit(pooled)
    scaled = deit()
    scaled.blocks[1].ls1 = nn.Parameter(torch.ones(64))
    with pytest.raises(ValueError, match=r"blocks\.1\.ls1"):
        recvit.from_vit(scaled)
    tanh = deit(act_layer=lambda: nn.GELU(approximate="tanh"))
    with pytest.raises(ValueError, match=r"vit: the MLP activation GELU\(approximate='tanh'\)"):
        recvit.from_vit(tanh)
    with pytest.raises(ValueError, match=r"vit: the MLP activation ReLU6\(\)"):  # ReLU up to 6 only
        recvit.from_vit(deit(act_layer=nn.ReLU6))
    # gated MLPs (timm's mlp_layer=): named, before their missing fc1 or their halved fc2 fails elsewhere
    for mlp_layer, act_layer, name in ((SwiGLU, nn.SiLU, "SwiGLU"), (SwiGLUPacked, nn.SiLU, "GluMlp"),
                                       (SwiGLUPacked, nn.GELU, "GluMlp"), (GluMlp, nn.ReLU, "GluMlp")):
        with pytest.raises(ValueError, match=rf"^vit: the MLP {name} \(blocks\.0\.mlp\): only a plain MLP"):
            recvit.from_vit(deit(mlp_layer=mlp_layer, act_layer=act_layer))
    with pytest.raises(ValueError, match="vit: hidden_act 'gelu_new': only 'gelu' and 'relu'"):
        recvit.from_vit(HFViT(deit(), hidden_act="gelu_new"))
    with pytest.raises(TypeError, match="vit: expected a timm VisionTransformer"):
        recvit.from_vit(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers=.*drop layers="):
        load_checkpoint(recvit.from_vit(deit()), deit().state_dict(), layers=(0, 1, 3))


def test_missing_or_extra_source_blocks_are_refused():
    model = recvit.create_model("deit_tiny_early_exit", **SMALL, num_steps=4)
    with pytest.raises(ValueError, match=r"missing 'blocks\.3\.norm1\.weight'"):
        load_checkpoint(model, deit(depth=3).state_dict())
    with pytest.raises(ValueError, match=r"no place in this model.*blocks\.4\."):
        load_checkpoint(model, deit(depth=5).state_dict())


@pytest.mark.parametrize("backend", ["packed", "triton"])
def test_ranker_depths_and_gradients_equal_eager(backend):
    """With the ranker's own depths (spread over 1..L): logits and every gradient of the loss."""
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    results = {}
    for name in ("eager", backend):
        model = recvit.from_vit(deit()).train()
        torch.manual_seed(2)
        model.ranker.fc2.weight.data.normal_(0, 1.0)
        out = model(images, return_aux=True, backend=name)
        recvit.EdgeRecViTLoss()(out, targets).total.backward()
        results[name] = out, {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    (out, grads), (reference, reference_grads) = results[backend], results["eager"]
    assert torch.equal(out.depths, reference.depths) and out.depths[:, 1:].unique().numel() > 2
    assert (out.depths[:, 0] == 4).all()
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-5)
    assert "ranker.fc1.weight" in reference_grads
    for key, grad in reference_grads.items():
        if grad.abs().max() > 0:
            torch.testing.assert_close(grads[key], grad, atol=1e-5, rtol=1e-4, msg=key)


def test_exited_tokens_run_fewer_blocks():
    """A token of depth d has the state after blocks 1..d (all tokens attending each other up to d)."""
    model = recvit.from_vit(deit())
    tokens = model.embed(torch.randn(1, 3, 32, 32))
    depths = random_depths(1, model.num_tokens, 4, "single")  # one token deep, the others 1
    with torch.no_grad():
        states = model.recursion(tokens, depths, backend="packed")
        after_one = model.blocks[0](tokens)
    shallow = depths[0] == 1
    torch.testing.assert_close(states[0, shallow], after_one[0, shallow], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(states[0, ~shallow], after_one[0, ~shallow])


def test_train_recipe_runs_and_freezes_the_blocks_in_stage_one(tmp_path):
    """``recvit train --model deit_tiny_early_exit --init deit.pth --freeze-epochs 1``: the DeiT weights
    load, the blocks stay frozen in stage 1 while the ranker and the rest learn."""
    data = tmp_path / "data"
    make_shapes_dataset(str(data), images_per_class=4, val_per_class=0, size=32, seed=5)
    source = deit(depth=12, embed_dim=192, num_heads=3, num_classes=4)
    torch.save(source.state_dict(), tmp_path / "deit.pth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = train.parse_args(["--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "2",
                                 "--freeze-epochs", "1", "--batch-size", "8", "--stop-after", "2", "--no-plot",
                                 "--model", "deit_tiny_early_exit", "--img-size", "32", "--patch-size", "8",
                                 "--workers", "0", "--no-progress", "--lr", "1e-3", "--warmup-epochs", "1",
                                 "--init", str(tmp_path / "deit.pth")])
        final = train.run(args).model.state_dict()
    finally:
        torch.set_num_threads(threads)
    initial = source.state_dict()
    assert all(torch.equal(initial[key], final[key].cpu()) for key in initial if key.startswith("blocks."))
    for prefix in ("patch_embed.", "head.", "norm.", "pos_embed"):
        assert any(not torch.equal(initial[key], final[key].cpu()) for key in initial if key.startswith(prefix))
    assert "ranker.fc1.weight" in final


def test_real_timm_deit_at_full_depth():
    """timm's own DeiT (where timm imports) through from_vit at every depth L equals its forward."""
    timm = pytest.importorskip("timm", reason="timm is not installed in this environment")
    source = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                               num_classes=10).eval()
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model = recvit.from_vit(source)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images, depths=full_depths(model, 2), backend="packed"),
                                   source(images), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_graph_replay_equals_eager(backend):
    """The early-exit DeiT's sync-free forward captured in one CUDA graph, replayed on new inputs."""
    assert rk.unavailable_reason(backend) is None, rk.unavailable_reason(backend)
    model = recvit.from_vit(deit(depth=12)).cuda()
    images = torch.randn(3, 3, 32, 32, device="cuda")
    graphed = recvit.compile_graph(model, images, depths=random_depths(3, 17, 12).cuda(), backend=backend)
    for _ in range(2):
        images, depths = torch.randn(3, 3, 32, 32, device="cuda"), random_depths(3, 17, 12).cuda()
        with torch.no_grad():
            expected = model(images, depths=depths, backend="eager")
        torch.testing.assert_close(graphed(images, depths), expected, atol=1e-4, rtol=1e-4)
