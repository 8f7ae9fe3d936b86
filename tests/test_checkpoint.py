"""Checkpoint mapping: timm and Hugging Face ViT state dicts (built here) -> Edge-RecViT and MoR-ViT."""
import pytest
import torch
import torch.nn.functional as F

from recvit import Block, EdgeRecViT, create_model
from recvit.checkpoint import (convert_state_dict, detect_source, load_checkpoint, no_source_prefixes,
                               save_checkpoint)

DIM, HEADS, BLOCKS, IMG, PATCH, CLASSES = 32, 4, 12, 32, 8, 10
TOKENS = (IMG // PATCH) ** 2 + 1
RANKER = ["ranker.fc1.weight", "ranker.fc2.weight"]


def timm_state(blocks=BLOCKS, scale=0.2):
    """A random ViT state dict in timm's key format (LayerNorm weights random too)."""
    state = {
        "cls_token": torch.randn(1, 1, DIM), "pos_embed": torch.randn(1, TOKENS, DIM),
        "patch_embed.proj.weight": torch.randn(DIM, 3, PATCH, PATCH) * 0.05,
        "patch_embed.proj.bias": torch.randn(DIM) * scale,
        "norm.weight": 1 + torch.randn(DIM) * scale, "norm.bias": torch.randn(DIM) * scale,
        "head.weight": torch.randn(CLASSES, DIM) * scale, "head.bias": torch.randn(CLASSES) * scale,
    }
    for i in range(blocks):
        for key, value in Block(DIM, HEADS).state_dict().items():
            noise = torch.randn_like(value) * scale
            state[f"blocks.{i}.{key}"] = 1 + noise if key.endswith("norm1.weight") or key.endswith(
                "norm2.weight") else noise
    return state


def to_hf(state, prefix="vit.", classifier=True):
    """The same weights in Hugging Face ViT's key format (q, k, v split)."""
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    inner = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    hf = {prefix + name: state[key] for key, name in top.items()}
    if classifier:
        hf["classifier.weight"], hf["classifier.bias"] = state["head.weight"], state["head.bias"]
    for key, value in state.items():
        if not key.startswith("blocks."):
            continue
        _, index, rest = key.split(".", 2)
        module, param = rest.rsplit(".", 1)
        layer = f"{prefix}encoder.layer.{index}."
        if module == "attn.qkv":
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                hf[f"{layer}attention.attention.{name}.{param}"] = part.clone()
        else:
            hf[f"{layer}{inner[module]}.{param}"] = value
    return hf


def small_model(**overrides):
    return EdgeRecViT(**{"img_size": IMG, "patch_size": PATCH, "num_classes": CLASSES, "embed_dim": DIM,
                         "num_heads": HEADS, **overrides}).eval()


def snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())


def dense_reference(state, images, layers, num_steps):
    """Plain pre-norm ViT over the source weights: head, shared x (L-2), tail, norm, head on [CLS]."""
    blocks = {}
    for index in set(layers):
        block = Block(DIM, HEADS).eval()
        block.load_state_dict({key[len(f"blocks.{index}."):]: value for key, value in state.items()
                               if key.startswith(f"blocks.{index}.")})
        blocks[index] = block
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([state["cls_token"].expand(len(images), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + state["pos_embed"]
    head, shared, tail = layers
    for index in [head] + [shared] * (num_steps - 2) + [tail]:
        x = blocks[index](x)
    x = F.layer_norm(x, (DIM,), state["norm.weight"], state["norm.bias"], 1e-6)
    return F.linear(x[:, 0], state["head.weight"], state["head.bias"])


def test_timm_and_hf_give_identical_weights():
    state = timm_state()
    from_timm = convert_state_dict(state, small_model(), layers=(1, 5, 10))
    for prefix in ("vit.", ""):
        from_hf = convert_state_dict(to_hf(state, prefix), small_model(), layers=(1, 5, 10))
        assert sorted(from_hf.state_dict) == sorted(from_timm.state_dict)
        assert all(torch.equal(value, from_timm.state_dict[key]) for key, value in from_hf.state_dict.items())
        assert from_hf.missing == RANKER
    assert from_timm.missing == RANKER
    assert sorted(from_timm.unused) == sorted(k for k in state if k.startswith("blocks.")
                                              and k.split(".")[1] not in ("1", "5", "10"))


@pytest.mark.parametrize("layers", [(0, 6, 11), (3, 8, 11)])
def test_mapped_tensors_equal_their_source(layers):
    state = timm_state()
    converted = convert_state_dict(state, small_model(), layers=layers).state_dict
    for role, index in zip(("head_layer", "shared_layer", "tail_layer"), layers):
        for param in ("attn.qkv.weight", "norm1.weight", "mlp.fc2.bias"):
            assert torch.equal(converted[f"recursion.{role}.{param}"], state[f"blocks.{index}.{param}"])
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.bias", "head.weight"):
        assert torch.equal(converted[key], state[key])


def test_hf_query_key_value_concatenation_order():
    """Converted attention equals Hugging Face's attention computed from separate q, k, v."""
    hf = to_hf(timm_state())
    model = small_model()
    load_checkpoint(model, hf, layers=(2, 6, 11))
    x = torch.randn(2, TOKENS, DIM)
    layer = "vit.encoder.layer.2.attention."

    def project(name):
        out = F.linear(x, hf[f"{layer}attention.{name}.weight"], hf[f"{layer}attention.{name}.bias"])
        return out.view(2, TOKENS, HEADS, DIM // HEADS).transpose(1, 2)

    q, k, v = project("query"), project("key"), project("value")
    probs = (q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5).softmax(-1)
    context = (probs @ v).transpose(1, 2).reshape(2, TOKENS, DIM)
    expected = F.linear(context, hf[f"{layer}output.dense.weight"], hf[f"{layer}output.dense.bias"])
    with torch.no_grad():
        got = model.recursion.head_layer.attn(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "packed"])
@pytest.mark.parametrize("layers,num_steps", [((0, 6, 11), 12), ((1, 4, 9), 5)])
def test_all_depth_L_equals_dense_source_forward(backend, layers, num_steps):
    state = timm_state()
    model = small_model(num_steps=num_steps)
    load_checkpoint(model, state, source="timm", layers=layers)
    images = torch.randn(3, 3, IMG, IMG)
    depths = torch.full((3, TOKENS), num_steps)
    with torch.no_grad():
        got = model(images, depths=depths, backend=backend)
        expected = dense_reference(state, images, layers, num_steps)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_safetensors_and_torch_files_load(tmp_path):
    from safetensors.torch import save_file
    state = timm_state()
    save_file(state, tmp_path / "vit.safetensors")
    torch.save({"model": state, "epoch": 3}, tmp_path / "vit.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in to_hf(state).items()}}, tmp_path / "hf.bin")
    models = [small_model() for _ in range(3)]
    load_checkpoint(models[0], tmp_path / "vit.safetensors")
    load_checkpoint(models[1], str(tmp_path / "vit.pth"))
    load_checkpoint(models[2], tmp_path / "hf.bin", source="hf")
    reference = convert_state_dict(state, models[0]).state_dict
    for model in models:
        loaded = model.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in reference.items())


def test_save_load_round_trip(tmp_path):
    source = small_model()
    load_checkpoint(source, timm_state())
    save_checkpoint(source, tmp_path / "recvit.safetensors")
    images = torch.randn(2, 3, IMG, IMG)
    for name in ("recvit", "auto"):
        target = small_model()
        converted = load_checkpoint(target, tmp_path / "recvit.safetensors", source=name)
        assert converted.missing == [] and converted.unused == []
        with torch.no_grad():
            expected, got = source(images, return_aux=True), target(images, return_aux=True)
        assert torch.equal(got.logits, expected.logits) and torch.equal(got.depths, expected.depths)


def test_keep_holds_back_a_new_classifier():
    state = timm_state()
    model = small_model(num_classes=5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'head.weight' -> 'head.weight': expected shape \(5, 32\)"):
        load_checkpoint(model, state)
    assert_unchanged(model, before)
    converted = load_checkpoint(model, state, keep=("head.",))
    assert sorted(converted.missing) == sorted(["head.weight", "head.bias"] + RANKER)
    assert {"head.weight", "head.bias"} <= set(converted.unused)
    assert torch.equal(model.head.weight, before["head.weight"])
    assert torch.equal(model.recursion.tail_layer.attn.qkv.weight, state["blocks.11.attn.qkv.weight"])


def test_hf_model_without_classifier_needs_keep_and_skips_the_pooler():
    hf = to_hf(timm_state(), prefix="", classifier=False)
    hf["pooler.dense.weight"], hf["pooler.dense.bias"] = torch.randn(DIM, DIM), torch.randn(DIM)
    with pytest.raises(ValueError, match="missing 'classifier.weight' for 'head.weight'"):
        convert_state_dict(hf, small_model())
    converted = convert_state_dict(hf, small_model(), keep=("head.",))
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(converted.unused)


def _drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _replace(key, value):
    return lambda state: {**state, key: value}


HF_QKV_BIAS = "'vit.encoder.layer.0.attention.attention.{}.bias'"
HF_KEY = "vit.encoder.layer.11.attention.attention.key.weight"


@pytest.mark.parametrize("edit,source,layers,match", [
    pytest.param(_drop("blocks.6.mlp.fc1.weight"), "auto", (0, 6, 11),
                 r"missing 'blocks.6.mlp.fc1.weight' for 'recursion.shared_layer.mlp.fc1.weight' "
                 r"\(expected shape \(128, 32\)\)", id="missing-key"),
    pytest.param(_replace("blocks.11.attn.qkv.weight", torch.zeros(96, 16)), "timm", (0, 6, 11),
                 r"'blocks.11.attn.qkv.weight' -> 'recursion.tail_layer.attn.qkv.weight': "
                 r"expected shape \(96, 32\), got \(96, 16\)", id="wrong-shape"),
    pytest.param(_replace("pos_embed", torch.zeros(1, 50, DIM)), "auto", (0, 6, 11),
                 r"'pos_embed' -> 'pos_embed': expected shape \(1, 17, 32\)", id="other-image-size"),
    pytest.param(lambda s: s, "timm", (0, 6, 12),
                 r"layers=\(0, 6, 12\): source block\(s\) \[12\] do not exist", id="layer-index"),
    pytest.param(lambda s: s, "timm", (0, 6), r"layers=\(0, 6\): expected three source block indices",
                 id="two-layers"),
    pytest.param(_replace("blocks.0.ls1.gamma", torch.ones(DIM)), "timm", (0, 6, 11),
                 r"no place.*'blocks.0.ls1.gamma'", id="layer-scale"),
    pytest.param(_replace("dist_token", torch.zeros(1, 1, DIM)), "auto", (0, 6, 11),
                 "distilled DeiT.*'dist_token'", id="distilled"),
    pytest.param(lambda s: to_hf(_drop("blocks.0.attn.qkv.bias")(s)), "hf", (0, 6, 11),
                 "missing " + ", ".join(HF_QKV_BIAS.format(n) for n in ("query", "key", "value")),
                 id="hf-missing-bias"),
    pytest.param(lambda s: {**to_hf(s), HF_KEY: torch.zeros(32, 16)}, "hf", (0, 6, 11),
                 f"'{HF_KEY}' -> 'recursion.tail_layer.attn.qkv.weight': "
                 r"expected shape \(32, 32\), got \(32, 16\)", id="hf-wrong-shape"),
    pytest.param(lambda s: {"weight": torch.zeros(3)}, "auto", (0, 6, 11), "cannot tell its key format",
                 id="unknown-format"),
    pytest.param(lambda s: {**s, "epoch": 3}, "auto", (0, 6, 11), r"tensors only.*'epoch'", id="non-tensor"),
    pytest.param(lambda s: s, "deit", (0, 6, 11), r"source='deit': expected one of", id="unknown-source"),
])
def test_bad_checkpoint_is_refused_and_model_untouched(edit, source, layers, match):
    model = small_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(model, edit(timm_state()), source=source, layers=layers)
    assert_unchanged(model, before)


def test_bad_arguments():
    with pytest.raises(FileNotFoundError, match="path="):
        load_checkpoint(small_model(), "/nonexistent/vit.safetensors")
    with pytest.raises(TypeError, match="path_or_state_dict"):
        load_checkpoint(small_model(), 3)
    with pytest.raises(ValueError, match="keep='head.'"):
        load_checkpoint(small_model(), timm_state(), keep="head.")
    assert detect_source(timm_state(blocks=1)) == "timm"
    assert detect_source(to_hf(timm_state(blocks=1))) == "hf"


def mor_model(**overrides):
    return create_model("mor_vit_tiny", **{"img_size": IMG, "patch_size": PATCH, "num_classes": CLASSES,
                                            "embed_dim": DIM, "num_heads": HEADS, **overrides}).eval()


def test_no_source_prefixes_come_from_the_model():
    assert no_source_prefixes(small_model()) == ("ranker.",)
    assert no_source_prefixes(mor_model()) == ("router.",)


@pytest.mark.parametrize("hf", [False, True])
def test_vit_loads_into_mor_vit_and_the_router_keeps_its_init(hf):
    state = timm_state()
    model = mor_model()
    before = snapshot(model)
    converted = load_checkpoint(model, to_hf(state) if hf else state, layers=(2, 7, 11))
    assert converted.missing == ["router.weight", "router.bias"]
    loaded = model.state_dict()
    for role, index in zip(("head_layer", "shared_layer", "tail_layer"), (2, 7, 11)):
        for key, value in state.items():
            if key.startswith(f"blocks.{index}."):
                assert torch.equal(loaded[f"recursion.{role}.{key.split('.', 2)[2]}"], value)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias", "head.weight", "head.bias"):
        assert torch.equal(loaded[key], state[key])
    assert torch.equal(loaded["router.weight"], before["router.weight"])
    assert torch.equal(loaded["router.bias"], before["router.bias"])


@pytest.mark.parametrize("backend", ["eager", "packed"])
def test_mor_vit_with_gates_one_equals_dense_source_forward(backend):
    """Token choice with every depth L and router gates g = sigmoid(30) = 1 in fp32: the gated update
    h + g (layer(h) - h) is the plain layer, so the model is the three-layer dense ViT."""
    state = timm_state()
    model = mor_model(routing="token_choice", num_steps=6)
    load_checkpoint(model, state, layers=(1, 4, 9))
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.bias.fill_(30.0)
        images = torch.randn(3, 3, IMG, IMG)
        out = model(images, depths=torch.full((3, TOKENS), 6), return_aux=True, backend=backend)
        expected = dense_reference(state, images, (1, 4, 9), 6)
    assert torch.all(out.confidence == 1.0)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_mor_vit_save_load_round_trip(tmp_path, routing):
    source = mor_model(routing=routing, num_steps=5)
    load_checkpoint(source, timm_state(), layers=(0, 5, 11))
    with torch.no_grad():
        source.router.weight.normal_()  # a router unlike the fresh model's
    save_checkpoint(source, tmp_path / "mor.safetensors")
    target = mor_model(routing=routing, num_steps=5)
    converted = load_checkpoint(target, tmp_path / "mor.safetensors")
    assert converted.missing == [] and converted.unused == []
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected, got = source(images, return_aux=True), target(images, return_aux=True)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.depths, expected.depths)
    assert torch.equal(got.depth_logits, expected.depth_logits)


@pytest.mark.parametrize("make_model,prefix,first_key", [
    (small_model, "ranker.", "ranker.fc1.weight"), (mor_model, "router.", "router.weight")])
def test_recvit_source_without_ranker_or_router_is_refused(make_model, prefix, first_key):
    """A recvit checkpoint must carry the ranker / router that a ViT source may lack."""
    state = {k: v for k, v in make_model().state_dict().items() if not k.startswith(prefix)}
    target = make_model()
    before = snapshot(target)
    with pytest.raises(ValueError, match=f"missing '{first_key}'"):
        load_checkpoint(target, state)
    assert_unchanged(target, before)


def test_real_timm_deit_all_depth_L_equals_three_layer_timm_forward():
    timm = pytest.importorskip("timm")
    source = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model = create_model("edge_recvit_tiny").eval()
    converted = load_checkpoint(model, source.state_dict(), layers=(0, 6, 11))
    assert converted.missing == RANKER
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        x = source._pos_embed(source.patch_embed(images))
        x = getattr(source, "norm_pre", torch.nn.Identity())(x)
        for block in [source.blocks[0]] + [source.blocks[6]] * 10 + [source.blocks[11]]:
            x = block(x)
        expected = source.head(source.norm(x)[:, 0])
        got = model(images, depths=torch.full((2, model.num_tokens), 12))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extension", [".safetensors", ".pt", ".pth", ".bin"])
def test_save_load_round_trip_for_every_extension(tmp_path, extension):
    source = small_model()
    path = tmp_path / f"model{extension}"
    save_checkpoint(source, path)
    written = path.read_bytes()
    assert written[:4] == b"PK\x03\x04" if extension != ".safetensors" else written[8:9] == b"{"
    target = small_model()
    load_checkpoint(target, path)
    assert all(torch.equal(value, target.state_dict()[key]) for key, value in source.state_dict().items())


def test_format_comes_from_the_bytes_not_the_name(tmp_path):
    source = small_model()
    save_checkpoint(source, tmp_path / "a.safetensors")
    save_checkpoint(source, tmp_path / "b.pth")
    (tmp_path / "a.safetensors").rename(tmp_path / "really_safetensors.pth")
    (tmp_path / "b.pth").rename(tmp_path / "really_torch.safetensors")
    torch.save(source.state_dict(), tmp_path / "legacy_pickle.bin", _use_new_zipfile_serialization=False)
    for name in ("really_safetensors.pth", "really_torch.safetensors", "legacy_pickle.bin"):
        target = small_model()
        load_checkpoint(target, tmp_path / name)
        assert torch.equal(target.pos_embed, source.pos_embed)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_sharded_checkpoint_loads_from_its_index(tmp_path, weights):
    """load_checkpoint takes a sharded checkpoint's index (from_pretrained's shard reader), by its
    bytes: under any name too. A missing shard is named, and the model is left untouched."""
    from test_public_checkpoint import write_sharded

    state = timm_state()
    write_sharded(tmp_path, state, weights)
    index = tmp_path / f"{weights}.index.json"
    expected, loaded = small_model(), small_model()
    load_checkpoint(expected, state)
    (tmp_path / "renamed").write_bytes(index.read_bytes())
    for path in (index, str(index), tmp_path / "renamed"):
        converted = load_checkpoint(loaded, path)
        assert converted.missing == RANKER and len(converted.unused) == 9 * len(Block(DIM, HEADS).state_dict())
        assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in expected.state_dict().items()
                   if key not in RANKER)
    shard = weights.replace(".", "-00002-of-00003.")
    (tmp_path / shard).unlink()
    untouched = small_model()
    before = snapshot(untouched)
    with pytest.raises(FileNotFoundError, match=rf"{index}: lists the shard '{shard}', which {tmp_path} lacks"):
        load_checkpoint(untouched, index)
    assert_unchanged(untouched, before)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_sharded_ddp_checkpoint_loads(tmp_path, weights):
    """A sharded checkpoint of a DDP-wrapped model: the index and the shards name every key with
    ``module.``; each shard matches the index as written, and the prefix goes from the merged state."""
    from test_public_checkpoint import write_sharded

    state = timm_state()
    write_sharded(tmp_path, {f"module.{key}": value for key, value in state.items()}, weights)
    expected, loaded = small_model(), small_model()
    load_checkpoint(expected, state)
    converted = load_checkpoint(loaded, tmp_path / f"{weights}.index.json")
    assert converted.missing == RANKER
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in expected.state_dict().items()
               if key not in RANKER)
    if weights == "pytorch_model.bin":  # a shard that holds no state dict is named
        shard = tmp_path / "pytorch_model-00002-of-00003.bin"
        torch.save([torch.zeros(1)], shard)
        with pytest.raises(ValueError, match=rf"{shard}: expected a shard of .*index.json \(a mapping of names "
                                             rf"to tensors\), got list"):
            load_checkpoint(small_model(), tmp_path / f"{weights}.index.json")


def test_save_refuses_an_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"path=.*m.ckpt.*expected the extension .safetensors .* \.pt, \.pth, \.bin"):
        save_checkpoint(small_model(), tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists()


class _NotAStateDict:
    pass


def _write_bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated-safetensors":
        save_checkpoint(small_model(), tmp_path / "full.safetensors")
        path.write_bytes((tmp_path / "full.safetensors").read_bytes()[:2000])
    elif kind == "truncated-torch":
        save_checkpoint(small_model(), tmp_path / "full.pth")
        path.write_bytes((tmp_path / "full.pth").read_bytes()[:2000])
    elif kind == "text":
        path.write_text("weights: [1, 2, 3]")
    elif kind == "json":  # JSON: read as a sharded checkpoint's index, which this is not
        path.write_text('{"weights": [1, 2, 3]}')
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "huge-header":
        path.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    elif kind == "pickled-object":
        torch.save({"model": _NotAStateDict()}, path)
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    return path


@pytest.mark.parametrize("kind,match", [
    ("truncated-safetensors", "a safetensors file that cannot be read"),
    ("truncated-torch", "a torch file that cannot be read"),
    ("text", r"not a checkpoint file recvit can read: expected safetensors .*, a torch file .* or a sharded "
             r"checkpoint's index \(JSON\), but .* starts with b'weights"),
    ("json", r"expected a shard index, a JSON object whose 'weight_map' maps parameter names to shard file names"),
    ("empty", r"not a checkpoint file .*\(0 bytes\)"),
    ("huge-header", "not a checkpoint file recvit can read"),
    ("pickled-object", r"a torch file holding more than tensors.*save model.state_dict\(\) instead.*_NotAStateDict"),
    ("list", "expected a state dict"),
])
def test_corrupt_or_foreign_files_name_the_file_and_what_was_expected(tmp_path, kind, match):
    path = _write_bad_file(tmp_path, kind)
    model = small_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as error:
        load_checkpoint(model, path)
    assert str(path) in str(error.value)
    assert_unchanged(model, before)


def test_checkpoint_of_another_size_says_which_model_fits(tmp_path):
    tiny = create_model("edge_recvit_tiny", img_size=IMG, patch_size=PATCH, num_classes=CLASSES)
    save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    model = small_model()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        load_checkpoint(model, tmp_path / "tiny.safetensors")
    message = str(error.value)
    assert message.startswith(str(tmp_path / "tiny.safetensors"))
    assert (f"fit create_model('edge_recvit_tiny', img_size={IMG}, patch_size={PATCH}, num_classes={CLASSES}); "
            f"this model has embed_dim {DIM}") in message
    assert "... and" in message and len(message.splitlines()) <= 13  # the key list is cut short
    assert_unchanged(model, before)
    odd = {**timm_state(), "cls_token": torch.zeros(1, 1, 40)}
    with pytest.raises(ValueError, match="embed_dim 40.*fit none of the registered models"):
        load_checkpoint(small_model(), odd)


def test_layers_on_a_recvit_checkpoint_is_refused(tmp_path):
    save_checkpoint(small_model(), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"layers=\(3, 6, 11\): only for a timm / Hugging Face ViT"):
        load_checkpoint(small_model(), tmp_path / "m.safetensors", layers=(3, 6, 11))
    load_checkpoint(small_model(), tmp_path / "m.safetensors", layers=(0, 6, 11))  # the default: no effect


def test_loaded_checkpoint_repr_is_short():
    """`load_checkpoint(...)` at a prompt prints counts and a few key names, never tensor values."""
    model = create_model("edge_recvit_tiny")
    loaded = load_checkpoint(model, create_model("edge_recvit_tiny").state_dict(),
                                    keep=("head.", "ranker.", "norm."))
    text = repr(loaded)
    assert len(text) < 300 and "tensor(" not in text and "\n" not in text
    assert text.startswith(f"ConvertedCheckpoint(state_dict=<{len(loaded.state_dict)} tensors, ")
    assert f"({len(loaded.missing) - 4} more)" in text and loaded.missing[0] in text
