"""Checkpoints of the public Edge-RecViT code (RicardoLee510520/Edge-RecViT at 35ec480): a state dict
in its key format and a config.json are built here with random weights; ``recvit.from_pretrained``
must reproduce a reference of the public evaluation forward (``training=False``) written below from
a reading of that code: router depths and logits."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import recvit
from recvit.checkpoint import convert_state_dict, detect_source, load_checkpoint, save_checkpoint
from tolerance import assert_flash_rule

DIM, HEADS, STEPS, IMG, PATCH, LABELS, HIDDEN = 32, 4, 6, 32, 8, 10, 64
TOKENS = (IMG // PATCH) ** 2 + 1
ROLES = ("head", "shared", "tail")


def public_config(**changes):
    """A config.json as the public code's MoRViTConfig.save_pretrained writes it."""
    config = {"architectures": ["MoRViTForImageClassification"], "model_type": "mor_vit",
              "hidden_size": DIM, "num_attention_heads": HEADS, "num_hidden_layers": STEPS,
              "intermediate_size": HIDDEN, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
              "image_size": IMG, "patch_size": PATCH, "num_channels": 3, "qkv_bias": True,
              "use_abs_pos_emb": True, "use_rel_pos_emb": True, "router_temperature": 1.0,
              "id2label": {str(i): f"LABEL_{i}" for i in range(LABELS)},
              "label2id": {f"LABEL_{i}": i for i in range(LABELS)}}
    config.update(changes)
    return config


def public_state(seed=0, prefix="mor_vit.", classifier=True, dim=DIM, hidden=None, positions=True, tokens=TOKENS):
    """Random weights under the public code's key names (MoRViTForImageClassification); without
    ``positions`` as its model with use_abs_pos_emb=False saves them (no position embeddings)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = dim * HIDDEN // DIM if hidden is None else hidden

    def rand(*shape, scale=0.2, offset=0.0):
        return torch.randn(*shape, generator=gen) * scale + offset

    state = {
        f"{prefix}embeddings.cls_token": rand(1, 1, dim, scale=1.0),
        f"{prefix}embeddings.position_embeddings": rand(1, tokens, dim, scale=1.0),
        f"{prefix}embeddings.patch_embeddings.weight": rand(dim, 3, PATCH, PATCH, scale=0.05),
        f"{prefix}embeddings.patch_embeddings.bias": rand(dim),
        # Large router weights: the depths spread over 1..L.
        f"{prefix}router.router.0.weight": rand(2 * dim, dim, scale=0.5),
        f"{prefix}router.router.2.weight": rand(2 * dim, 2 * dim, scale=0.3),
        f"{prefix}router.router.4.weight": rand(STEPS, 2 * dim, scale=0.3),
        f"{prefix}layernorm.weight": rand(dim, offset=1.0), f"{prefix}layernorm.bias": rand(dim),
    }
    if not positions:
        del state[f"{prefix}embeddings.position_embeddings"]
    for role in ROLES:
        block = f"{prefix}block_{role}."
        for name in ("query", "key", "value", "proj"):
            state[f"{block}attention.{name}.weight"] = rand(dim, dim)
            state[f"{block}attention.{name}.bias"] = rand(dim)
        for name in ("layernorm_before", "layernorm_after"):
            state[f"{block}{name}.weight"], state[f"{block}{name}.bias"] = rand(dim, offset=1.0), rand(dim)
        state[f"{block}intermediate.weight"], state[f"{block}intermediate.bias"] = rand(hidden, dim), rand(hidden)
        state[f"{block}output.weight"], state[f"{block}output.bias"] = rand(dim, hidden), rand(dim)
    if classifier:
        state["classifier.weight"], state["classifier.bias"] = rand(LABELS, dim), rand(LABELS)
    return state


def public_forward(state, images, eps=1e-12, prefix="mor_vit.", act=F.gelu, num_heads=HEADS):
    """The public code's evaluation forward, re-derived: the router's argmax depth ([CLS] forced to
    L) turns into per-step gates; EVERY token runs every step's layer (attention over all tokens)
    and takes the update only while its gate is 1: h <- h + gate * (layer(h) - h). Widths come from
    the weights; ``act`` is the MLP's activation; positions are added if the weights hold them."""
    w = {key[len(prefix):] if key.startswith(prefix) else key: value.to(images.dtype)
         for key, value in state.items()}
    batch, dim = images.shape[0], w["embeddings.cls_token"].shape[-1]
    x = F.conv2d(images, w["embeddings.patch_embeddings.weight"], w["embeddings.patch_embeddings.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([w["embeddings.cls_token"].expand(batch, 1, dim), x], 1)
    if "embeddings.position_embeddings" in w:
        x = x + w["embeddings.position_embeddings"]
    scores = F.linear(F.relu(F.linear(F.gelu(F.linear(x, w["router.router.0.weight"])),
                                      w["router.router.2.weight"])), w["router.router.4.weight"])
    choice = F.one_hot(scores.argmax(-1), STEPS).to(x.dtype)
    choice[:, 0] = 0
    choice[:, 0, -1] = 1
    gates = 1 - choice.cumsum(-1) + choice  # gates[..., s] = 1 while step s + 1 <= depth

    def layer(h, block):
        def lin(name, value):
            return F.linear(value, w[f"{block}{name}.weight"], w[f"{block}{name}.bias"])

        def heads(value):
            return value.view(batch, -1, num_heads, dim // num_heads).transpose(1, 2)

        normed = F.layer_norm(h, (dim,), w[f"{block}layernorm_before.weight"],
                              w[f"{block}layernorm_before.bias"], eps)
        q, k, v = (heads(lin(f"attention.{name}", normed)) for name in ("query", "key", "value"))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(dim // num_heads)).softmax(-1)
        h = h + lin("attention.proj", (probs @ v).transpose(1, 2).reshape(batch, -1, dim))
        normed = F.layer_norm(h, (dim,), w[f"{block}layernorm_after.weight"], w[f"{block}layernorm_after.bias"],
                              eps)
        return h + lin("output", act(lin("intermediate", normed)))

    for step in range(STEPS):
        role = "head" if step == 0 else "tail" if step == STEPS - 1 else "shared"
        x = x + gates[..., step:step + 1] * (layer(x, f"block_{role}.") - x)
    x = F.layer_norm(x, (dim,), w["layernorm.weight"], w["layernorm.bias"], eps)
    depths = scores.argmax(-1) + 1
    depths[:, 0] = STEPS
    return F.linear(x[:, 0], w["classifier.weight"], w["classifier.bias"]), depths, scores


def write_checkpoint(directory, state=None, config=None, weights="model.safetensors"):
    (directory / "config.json").write_text(json.dumps(public_config() if config is None else config))
    state = public_state() if state is None else state
    if weights.endswith(".safetensors"):
        save_file(state, directory / weights)
    else:
        torch.save(state, directory / weights)
    return state


def write_sharded(directory, state, weights="model.safetensors", shards=3):
    """What the public code's save_pretrained(max_shard_size=...) writes: the state dict cut in key
    order into ``shards`` files (model-00001-of-00003.safetensors, ... or pytorch_model-...bin) and
    ``<weights>.index.json``: {"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}."""
    stem, extension = weights.rsplit(".", 1)
    keys, weight_map = list(state), {}
    for index in range(shards):
        name = f"{stem}-{index + 1:05d}-of-{shards:05d}.{extension}"
        part = {key: state[key] for key in keys[index * len(keys) // shards:(index + 1) * len(keys) // shards]}
        if extension == "safetensors":
            save_file(part, directory / name, metadata={"format": "pt"})
        else:
            torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(value.numel() * value.element_size() for value in state.values())
    (directory / f"{weights}.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    return weight_map


def assert_reproduces(model, state, act=F.gelu, num_heads=HEADS, img_size=IMG):
    """Depths equal the reference's and logits within the flash rule (fp32 vs an fp64 reference)."""
    images = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    reference, ref_depths, scores = public_forward(state, images.double(), act=act, num_heads=num_heads)
    top2 = scores.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4  # no near-tie: the argmax is the same in fp32
    assert len(ref_depths[:, 1:].unique()) >= 4  # tokens exit at several steps
    plain, _, _ = public_forward(state, images, act=act, num_heads=num_heads)
    with torch.no_grad():
        out = model(images, return_aux=True)
    assert torch.equal(out.depths, ref_depths)
    assert_flash_rule(out.logits, plain, reference, floor=1e-5)


def public_model(**overrides):
    return recvit.EdgeRecViT(**{"img_size": IMG, "patch_size": PATCH, "num_classes": LABELS, "embed_dim": DIM,
                                "num_heads": HEADS, "mlp_ratio": HIDDEN / DIM, "num_steps": STEPS,
                                "eps": 1e-12, "kv": "all", "ranker": "public_3layer", **overrides}).eval()


def snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model, before):
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


@pytest.mark.parametrize("backend", ["eager", "packed"])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_from_pretrained_reproduces_the_public_forward(tmp_path, backend, weights):
    state = write_checkpoint(tmp_path, weights=weights)
    model = recvit.from_pretrained(tmp_path, backend=backend)
    assert not model.training and model.recursion.kv == "all" and model.norm.eps == 1e-12
    assert model.recursion.shared_layer.norm2.eps == 1e-12 and model.num_classes == LABELS
    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    reference, ref_depths, scores = public_forward(state, images.double())
    top2 = scores.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4  # no near-tie: the argmax is the same in fp32
    assert len(ref_depths[:, 1:].unique()) >= 4  # the depths spread: tokens exit at several steps
    with torch.no_grad():
        out = model(images, return_aux=True)
        plain, _, _ = public_forward(state, images)  # the same reference in fp32
    assert torch.equal(out.depths, ref_depths)
    torch.testing.assert_close(out.depth_logits.double(), scores, atol=1e-5, rtol=1e-5)
    assert_flash_rule(out.logits, plain, reference, floor=1e-5)
    # The paper's kv="active" is a different function once tokens exit.
    with torch.no_grad():
        active = model(images, kv="active")
    assert (active.double() - reference).abs().max() > 1e-3


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_sharded_checkpoint_reproduces_the_public_forward(tmp_path, weights):
    state = public_state()
    (tmp_path / "config.json").write_text(json.dumps(public_config()))
    weight_map = write_sharded(tmp_path, state, weights)
    # one fused qkv is cut across two shards: its query and value lie in different files
    assert len({weight_map[f"mor_vit.block_{role}.attention.{name}.weight"]
                for role in ROLES for name in ("query", "value")}) > 1
    assert_reproduces(recvit.from_pretrained(tmp_path), state)


def _shard_problem(kind):
    def setup(directory):
        (directory / "config.json").write_text(json.dumps(public_config()))
        write_sharded(directory, public_state())
        index = directory / "model.safetensors.index.json"
        if kind == "no-shard":
            (directory / "model-00002-of-00003.safetensors").unlink()
        elif kind == "key-not-in-shard":
            index_json = json.loads(index.read_text())
            index_json["weight_map"]["classifier.bias"] = "model-00001-of-00003.safetensors"  # in shard 3
            index.write_text(json.dumps(index_json))
        elif kind == "not-json":
            index.write_text("{not json")
        elif kind == "no-weight-map":
            index.write_text(json.dumps({"metadata": {}}))
        elif kind == "index-as-shard":  # read as weights, it would read itself again and again
            index.write_text(json.dumps({"weight_map": {"mor_vit.layernorm.bias": index.name}}))
        elif kind == "outside":
            index.write_text(json.dumps({"weight_map": {"mor_vit.layernorm.bias": "../model.safetensors"}}))
    return setup


@pytest.mark.parametrize("kind,error,match", [
    ("no-shard", FileNotFoundError, r"index.json: lists the shard 'model-00002-of-00003.safetensors', which .* lacks"),
    ("key-not-in-shard", ValueError, r"model-00001-of-00003.safetensors: does not match .*index.json: listed there "
                                     r"but not in the shard: \['classifier.bias'\]"),
    ("not-json", ValueError, r"model.safetensors.index.json: not a JSON file"),
    ("no-weight-map", ValueError, r"index.json: expected a shard index, a JSON object whose 'weight_map'"),
    ("index-as-shard", ValueError, r"index.json: lists the shard 'model.safetensors.index.json', which is an "
                                   r"index itself, not weights"),
    ("outside", ValueError, r"shard '../model.safetensors': expected a file name beside the index"),
])
def test_bad_sharded_checkpoint_names_the_file(tmp_path, kind, error, match):
    _shard_problem(kind)(tmp_path)
    with pytest.raises(error, match=match):
        recvit.from_pretrained(tmp_path)


# Configs the public code runs, each as its MoRViTBlock / MoRViTEmbeddings compute them.
PUBLIC_VARIANTS = {
    "relu": ({"hidden_act": "relu"}, {}, F.relu),
    "gelu_new-is-relu": ({"hidden_act": "gelu_new"}, {}, F.relu),  # anything but "gelu" is nn.ReLU there
    "no-positions": ({"use_abs_pos_emb": False}, {"positions": False}, F.gelu),
    # 61 / 56 is no whole ratio, and int(56 * (61 / 56)) is 60
    "mlp-width-61": ({"hidden_size": 56, "intermediate_size": 61}, {"dim": 56, "hidden": 61}, F.gelu),
    # the stride-8 convolution reads 24 of the 30 pixel rows and columns: 3x3 patches
    "image-size-30": ({"image_size": 30}, {"tokens": 10}, F.gelu),
    "all-three": ({"hidden_act": "silu", "use_abs_pos_emb": False, "hidden_size": 56, "intermediate_size": 61},
                  {"dim": 56, "hidden": 61, "positions": False}, F.relu),
}


@pytest.mark.parametrize("backend", ["eager", "packed"])
@pytest.mark.parametrize("variant", list(PUBLIC_VARIANTS))
def test_public_config_variants_reproduce_the_public_forward(tmp_path, variant, backend):
    config, state_options, act = PUBLIC_VARIANTS[variant]
    state = write_checkpoint(tmp_path, state=public_state(**state_options), config=public_config(**config))
    model = recvit.from_pretrained(tmp_path, backend=backend)
    assert model.recursion.shared_layer.mlp.fc1.out_features == state_options.get("hidden", HIDDEN)
    if not config.get("use_abs_pos_emb", True):
        assert torch.equal(model.pos_embed, torch.zeros(1, TOKENS, config.get("hidden_size", DIM)))
    assert model.num_tokens == state_options.get("tokens", TOKENS)
    assert_reproduces(model, state, act, img_size=config.get("image_size", IMG))


@pytest.mark.parametrize("static_shapes", [False, True], ids=["packed-prefix", "sync-free"])
def test_relu_and_odd_mlp_width_on_the_triton_backend(tmp_path, static_shapes):
    import recvit_kernels as rk

    if rk.unavailable_reason("triton") is not None:
        pytest.skip(rk.unavailable_reason("triton"))
    config = public_config(hidden_act="relu", use_abs_pos_emb=False, hidden_size=48, num_attention_heads=3,
                           intermediate_size=61)  # head_dim 16, which triton's attention takes
    state = write_checkpoint(tmp_path, state=public_state(dim=48, hidden=61, positions=False), config=config)
    model = recvit.from_pretrained(tmp_path, backend="triton")
    model.recursion.static_shapes = static_shapes
    assert_reproduces(model, state, F.relu, num_heads=3)


def test_relu_model_trains_on_the_packed_path_as_on_eager():
    """The relu MLP under autograd (out of place): packed gradients equal eager's."""
    model = public_model(mlp_activation="relu", mlp_hidden_dim=61).train()
    images = torch.randn(2, 3, IMG, IMG)
    grads = {}
    for backend in ("eager", "packed"):
        model.zero_grad()
        model(images, backend=backend).square().sum().backward()
        grads[backend] = [p.grad.clone() for p in model.recursion.parameters()]
    for eager, packed in zip(grads["eager"], grads["packed"]):
        torch.testing.assert_close(packed, eager, atol=1e-5, rtol=1e-4)


def test_bare_mor_vit_without_classifier_loads_with_keep():
    state = public_state(prefix="", classifier=False)
    assert detect_source(state) == "public"
    model = public_model()
    head = model.head.weight.clone()
    converted = load_checkpoint(model, state, keep=("head.",))
    assert sorted(converted.missing) == ["head.bias", "head.weight"]
    assert torch.equal(model.head.weight, head)
    assert torch.equal(model.ranker.fc3.weight, state["router.router.4.weight"])


def test_key_mapping():
    state = public_state()
    converted = convert_state_dict(state, public_model()).state_dict
    qkv = converted["recursion.shared_layer.attn.qkv.weight"]
    for part, name in zip(qkv.chunk(3), ("query", "key", "value")):
        assert torch.equal(part, state[f"mor_vit.block_shared.attention.{name}.weight"])
    pairs = {"patch_embed.proj.weight": "mor_vit.embeddings.patch_embeddings.weight",
             "ranker.fc2.weight": "mor_vit.router.router.2.weight",
             "recursion.tail_layer.mlp.fc2.bias": "mor_vit.block_tail.output.bias",
             "recursion.head_layer.norm2.weight": "mor_vit.block_head.layernorm_after.weight",
             "norm.bias": "mor_vit.layernorm.bias", "head.weight": "classifier.weight"}
    for target, source in pairs.items():
        assert torch.equal(converted[target], state[source])


@pytest.mark.parametrize("extension", [".safetensors", ".pth"])
def test_round_trip_through_recvit_files(tmp_path, extension):
    write_checkpoint(tmp_path)
    model = recvit.from_pretrained(tmp_path)
    save_checkpoint(model, tmp_path / f"ours{extension}")
    again = public_model()
    converted = load_checkpoint(again, tmp_path / f"ours{extension}")
    assert converted.missing == [] and converted.unused == []
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(again(images), model(images))


def _drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("edit,kwargs,match", [
    pytest.param(_drop("mor_vit.block_shared.attention.key.bias"), {},
                 r"missing 'mor_vit.block_shared.attention.key.bias' for 'recursion.shared_layer.attn.qkv.bias'",
                 id="missing-key"),
    pytest.param(lambda s: {**s, "mor_vit.router.router.2.weight": torch.zeros(2 * DIM, DIM)}, {},
                 r"'mor_vit.router.router.2.weight' -> 'ranker.fc2.weight': expected shape \(64, 64\), "
                 r"got \(64, 32\)", id="wrong-shape"),
    pytest.param(lambda s: {**s, "mor_vit.block_head.attention.proj.dora_A": torch.zeros(4, DIM)}, {},
                 r"(?s)no place.*dora_A.*merge_all_dora_weights", id="unmerged-dora"),
    pytest.param(lambda s: s, {"layers": (1, 6, 11)}, r"layers=\(1, 6, 11\): only for a timm", id="layers"),
])
def test_bad_public_checkpoint_is_refused_and_model_untouched(edit, kwargs, match):
    model = public_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(model, edit(public_state()), **kwargs)
    assert_unchanged(model, before)


def test_missing_key_bias_names_its_own_shape_and_not_the_present_query_and_value():
    state = _drop("mor_vit.block_shared.attention.key.bias")(public_state())
    with pytest.raises(ValueError) as error:
        load_checkpoint(public_model(), state)
    problems = str(error.value).splitlines()[1:]
    assert [line.strip() for line in problems] == [
        f"missing 'mor_vit.block_shared.attention.key.bias' for 'recursion.shared_layer.attn.qkv.bias' "
        f"(expected shape ({DIM},), a third of ({3 * DIM},))"]


def test_checkpoint_of_another_width_names_the_model_it_fits():
    model = public_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"fit create_model\('edge_recvit_small', img_size=32, patch_size=8, "
                                         r"num_classes=10, ranker='public_3layer'\); this model has embed_dim 32"):
        load_checkpoint(model, public_state(dim=384))
    assert_unchanged(model, before)


def test_paper_ranker_model_is_told_to_use_the_public_one():
    model = public_model(ranker="earr")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ranker='public_3layer'.*from_pretrained"):
        load_checkpoint(model, public_state())
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"ranker='mlp'.*'earr'"):
        public_model(ranker="mlp")


def test_from_pretrained_takes_settings_from_the_config(tmp_path):
    write_checkpoint(tmp_path, config=public_config(layer_norm_eps=1e-6, id2label={"0": "a", "1": "b", "2": "c"}),
                     state={**public_state(), "classifier.weight": torch.zeros(3, DIM),
                            "classifier.bias": torch.zeros(3)})
    model = recvit.from_pretrained(tmp_path)
    assert model.norm.eps == 1e-6 and model.recursion.head_layer.norm1.eps == 1e-6 and model.num_classes == 3


@pytest.mark.parametrize("setup,error,match", [
    pytest.param(lambda d: None, FileNotFoundError, "config.json: no such file", id="no-config"),
    pytest.param(lambda d: (d / "config.json").write_text("{not json"), ValueError, "not a JSON file",
                 id="bad-json"),
    pytest.param(lambda d: (d / "config.json").write_text(json.dumps({"model_type": "vit"})), ValueError,
                 r"model_type 'vit': expected 'mor_vit'", id="other-model"),
    pytest.param(lambda d: write_checkpoint(d, state=public_state(), config=public_config(use_abs_pos_emb=False)),
                 ValueError, r"holds 'mor_vit.embeddings.position_embeddings', but .*config.json sets "
                             r"use_abs_pos_emb false", id="positions-against-config"),
    pytest.param(lambda d: (d / "config.json").write_text(json.dumps(public_config())), FileNotFoundError,
                 r"no weights: expected one of model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
                 r"pytorch_model.bin.index.json there", id="no-weights"),
    pytest.param(lambda d: write_checkpoint(d, config=public_config(hidden_size=48, num_attention_heads=4)),
                 ValueError, r"expected shape \(1, 1, 48\), got \(1, 1, 32\)", id="config-other-size"),
])
def test_from_pretrained_errors(tmp_path, setup, error, match):
    setup(tmp_path)
    with pytest.raises(error, match=match):
        recvit.from_pretrained(tmp_path)


def test_from_pretrained_shape_error_names_the_config_without_a_registry_hint(tmp_path):
    write_checkpoint(tmp_path, config=public_config(hidden_size=48, num_attention_heads=4))
    with pytest.raises(ValueError) as error:
        recvit.from_pretrained(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'model.safetensors'}: the weights do not fit the model "
                              f"{tmp_path / 'config.json'} describes: ")
    assert "registered models" not in message and "create_model" not in message
    # a width of a registered model (Small, 384): still no hint, the model is the config's
    write_checkpoint(tmp_path, state=public_state(dim=384), config=public_config(hidden_size=48, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"expected shape \(1, 1, 48\), got \(1, 1, 384\)") as error:
        recvit.from_pretrained(tmp_path)
    assert "create_model" not in str(error.value)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_public_forward_on_the_gpu_backends(tmp_path, backend):
    import recvit_kernels as rk

    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    state = write_checkpoint(tmp_path)
    model = recvit.from_pretrained(tmp_path, backend=backend).cuda()
    # Fixed images whose router scores have no near-tie: the model's fp32 patch convolution runs in
    # TF32 on the GPU (cuDNN's default), about 1e-3 off, which flips the argmax depth of a token whose
    # top two scores are closer (2 of 300 random batches here, simulated on the CPU).
    images = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1)).cuda()
    reference, ref_depths, scores = public_forward({k: v.cuda() for k, v in state.items()}, images.double())
    top2 = scores.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-2
    plain, _, _ = public_forward({k: v.cuda() for k, v in state.items()}, images)
    with torch.no_grad():
        out = model(images, return_aux=True)
    assert torch.equal(out.depths, ref_depths)
    assert_flash_rule(out.logits, plain, reference, floor=1e-4)


def test_flops_count_the_three_layer_ranker():
    model = public_model()
    earr = public_model(ranker="earr")
    depths = torch.full((1, TOKENS), STEPS)
    extra = recvit.count_flops(model, depths).ranker - recvit.count_flops(earr, depths).ranker
    assert extra == 2 * TOKENS * (2 * DIM) ** 2  # the 2C x 2C linear
    assert recvit.count_flops(earr, depths).ranker == 2 * TOKENS * (DIM * 2 * DIM + 2 * DIM * STEPS)
