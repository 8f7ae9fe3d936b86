"""Checkpoint mapping: DeiT/ViT weights in timm's or Hugging Face's key format -> Edge-RecViT;
checkpoints of the public Edge-RecViT code; recvit's own files.

Three source blocks become the recursive block: ``layers=(a, b, c)`` maps source block ``a`` to
``recursion.head_layer``, ``b`` to ``recursion.shared_layer`` (run at steps 2..L-1) and ``c`` to
``recursion.tail_layer``. The public code uses (0, 6, 11); the supplement (Sec. 4.2) reports that
mappings drawn from deeper source layers fine-tune to consistently higher accuracy at every scale.
Patch embedding, [CLS], positions, final norm and classifier are mapped by name. What assigns the
depths (Edge-RecViT's ranker, MoR-ViT's router) has no counterpart in a ViT: it keeps its
initialisation and is reported in ``missing`` (:func:`no_source_prefixes`). The same mapping serves
MoR-ViT, whose layers are plain ViT layers (its gated update with g = 1 is the ViT update). An
early-exit DeiT/ViT (:class:`recvit.EarlyExitViT`) takes every source block as its own block i
(its keys are timm's; ``layers`` does not apply, and a source with more or fewer blocks is refused).

Refused, never guessed: distilled DeiT checkpoints (``dist_token``/``head_dist``; their blocks were
trained with a second token, so dropping it changes the function; the paper starts from the
non-distilled DeiT), and any source parameter of a chosen block or of the embedding/head that this
model has no place for (layer scale, qk-norm, register tokens, ...). Positions are not resized: the
model's image and patch size must match the source's. Hugging Face ViT uses LayerNorm eps 1e-12
where timm and this package use 1e-6; the state dict does not carry eps, build the model with
``eps=1e-12`` to reproduce a Hugging Face model exactly.

The public Edge-RecViT code (RicardoLee510520/Edge-RecViT, which names its model ``MoRViT``, config
``model_type: "mor_vit"``) saves ``mor_vit.block_head/block_shared/block_tail`` with separate query,
key and value, ``attention.proj``, ``intermediate``, ``output``, ``layernorm_before/after``,
``mor_vit.embeddings.patch_embeddings`` (a bare conv), ``mor_vit.layernorm``, ``classifier`` and its
three-layer router under ``mor_vit.router.router.{0,2,4}`` (``source="public"``): it needs a model
built with ``ranker="public_3layer"``; :func:`from_pretrained` builds that model from the
checkpoint's ``config.json`` (eps 1e-12, ``kv="all"``) and loads it, from one file or from the
shards an index lists (:func:`read_sharded_state_dict`).

Every key and shape is checked before anything is copied: a checkpoint that does not fit raises a
ValueError naming the keys and shapes (and, for another model size, the model its shapes fit),
and the model is left untouched. Files are read by their bytes, not their name: safetensors, a
torch file (zip or legacy pickle) read with ``weights_only=True``, or a sharded checkpoint's index
(JSON) with its shards beside it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

SOURCES = ("auto", "timm", "hf", "recvit", "public")
DEFAULT_LAYERS = (0, 6, 11)
# What save_checkpoint writes for each extension; load_checkpoint reads any of them by their bytes.
SAFETENSORS_EXTENSIONS = (".safetensors",)
TORCH_EXTENSIONS = (".pt", ".pth", ".bin")
# The public code's save_pretrained output, in the order transformers' from_pretrained looks for it.
PUBLIC_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
ROLES = ("head_layer", "shared_layer", "tail_layer")
# Model parameters (top-level names) that a ViT has too; every other top-level module has no source.
VIT_NAMES = ("cls_token", "pos_embed", "patch_embed", "recursion", "blocks", "norm", "head")

_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_HF_BLOCK = re.compile(r"^(?:vit\.)?encoder\.layer\.(\d+)\.")
# timm name -> Hugging Face ViT name (under the "vit." prefix, except the classifier).
_HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_CLASSIFIER = {"head.weight": "classifier.weight", "head.bias": "classifier.bias"}
_HF_IN_BLOCK = {
    "norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
_HF_QKV = ("query", "key", "value")
# The public Edge-RecViT code (MoRViTForImageClassification; its bare MoRViT lacks "mor_vit.").
_PUBLIC_BLOCK = re.compile(r"^(?:mor_vit\.)?block_(head|shared|tail)\.")
_PUBLIC_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "ranker.fc1.weight": "router.router.0.weight",
    "ranker.fc2.weight": "router.router.2.weight",
    "ranker.fc3.weight": "router.router.4.weight",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_PUBLIC_IN_BLOCK = {
    "norm1": "layernorm_before", "attn.proj": "attention.proj", "norm2": "layernorm_after",
    "mlp.fc1": "intermediate", "mlp.fc2": "output",
}
# The public code's config (MoRViTConfig) defaults, for keys a config.json leaves out.
_PUBLIC_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                  "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": True,
                  "use_abs_pos_emb": True}


class ConvertedCheckpoint(NamedTuple):
    """state_dict: model key -> tensor, every shape checked against the model. missing: model keys
    the source does not provide (they keep their initialisation: the ranker or router, plus ``keep``).
    unused: source keys deliberately left out (blocks not chosen, the HF pooler, kept keys)."""

    state_dict: dict
    missing: list
    unused: list

    def __repr__(self) -> str:
        """Counts and the first few key names, never the tensors."""
        def keys(names: list) -> str:
            shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
            return f"[{shown}]"

        values = sum(tensor.numel() for tensor in self.state_dict.values())
        return (f"ConvertedCheckpoint(state_dict=<{len(self.state_dict)} tensors, {values:,} values>, "
                f"missing={keys(self.missing)}, unused={keys(self.unused)})")


def no_source_prefixes(model: nn.Module) -> tuple:
    """Key prefixes of ``model`` that a DeiT/ViT checkpoint cannot provide: its top-level modules
    outside :data:`VIT_NAMES` (``("ranker.",)`` for Edge-RecViT, ``("router.",)`` for MoR-ViT).
    Loading from timm / Hugging Face leaves them initialised and lists them in ``missing``."""
    names = {key.split(".", 1)[0] for key in model.state_dict() if "." in key}
    return tuple(sorted(f"{name}." for name in names - set(VIT_NAMES)))


def detect_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'recvit', 'timm', 'hf' or 'public' from the key names; ValueError if none fits."""
    keys = list(state_dict)
    if any(key.startswith("recursion.") for key in keys):
        return "recvit"
    if any(_TIMM_BLOCK.match(key) for key in keys):
        return "timm"
    if any(_HF_BLOCK.match(key) for key in keys):
        return "hf"
    if any(_PUBLIC_BLOCK.match(key) for key in keys):
        return "public"
    raise ValueError(f"state_dict: cannot tell its key format (expected timm 'blocks.{{i}}.*', Hugging "
                     f"Face 'vit.encoder.layer.{{i}}.*', the public Edge-RecViT code's "
                     f"'mor_vit.block_head.*' or recvit 'recursion.*'); first keys: {keys[:5]}")


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str = "auto",
                       layers: Optional[Sequence[int]] = None,
                       keep: Sequence[str] = ()) -> ConvertedCheckpoint:
    """Map a timm / Hugging Face ViT, public Edge-RecViT or recvit state dict onto ``model``'s keys
    and check it fits.

    ``layers``: source blocks for (head, shared, tail) of a timm / Hugging Face ViT (default
    (0, 6, 11)); any other value is refused for recvit and public checkpoints, which hold the
    recursive block already.
    ``keep``: model key prefixes that keep their initialisation instead of being loaded
    (``("head.",)`` for a new label set). Raises ValueError listing every missing, unknown or
    mis-shaped key.
    """
    return _convert_state_dict(state_dict, model, source, layers, keep, fit_hint=True)


def _convert_state_dict(state_dict, model, source, layers, keep, fit_hint: bool) -> ConvertedCheckpoint:
    """:func:`convert_state_dict`; ``fit_hint``: name the registered models a mis-shaped checkpoint
    fits (not for :func:`from_pretrained`, whose model is the one its config.json describes)."""
    _check_state_dict(state_dict)
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {SOURCES}")
    _refuse_distilled(state_dict)
    if source == "auto":
        source = detect_source(state_dict)
    # The default passed explicitly changes nothing (callers that always pass layers= keep working).
    if source in ("recvit", "public") and layers is not None and tuple(layers) != DEFAULT_LAYERS:
        raise ValueError(f"layers={layers!r}: only for a timm / Hugging Face ViT, whose blocks are picked "
                         f"for the recursive block; this {source} checkpoint holds its head, shared and tail "
                         f"layers already, drop layers=")
    if source == "public":
        _check_public_ranker(model)
    targets = model.state_dict()
    if source == "recvit":
        names, block_of = {key: [key] for key in targets}, {}
    elif source == "public":
        names, block_of = {key: _public_source_names(key, state_dict) for key in targets}, {}
    else:
        pattern = _TIMM_BLOCK if source == "timm" else _HF_BLOCK
        block_of = {key: int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
        if any(key.startswith("recursion.") for key in targets):
            layers = _check_layers(DEFAULT_LAYERS if layers is None else layers, state_dict, source)
        elif layers is not None and tuple(layers) != DEFAULT_LAYERS:
            raise ValueError(f"layers={layers!r}: only for a model with a recursive block; "
                             f"{type(model).__name__} takes every source block as its own, drop layers=")
        else:  # the model's blocks.{i} are the source's blocks.{i}: every source block is used
            layers = tuple(sorted(set(block_of.values())))
        names = {key: _source_names(key, layers, source, state_dict) for key in targets}

    if isinstance(keep, str) or not all(isinstance(prefix, str) for prefix in keep):
        raise ValueError(f"keep={keep!r}: expected a sequence of model key prefixes, e.g. ('head.',)")
    keep = tuple(keep)
    may_lack = no_source_prefixes(model) if source in ("timm", "hf") else ()  # a ViT has no ranker/router
    converted, missing, consumed, held, problems, mismatched = {}, [], set(), set(), [], False
    for target, expected in targets.items():
        sources = names[target]
        if target.startswith(keep):
            missing.append(target)
            held.update(sources)
            continue
        # HF's query, key and value each fill a third of the qkv rows, in that order.
        part = (expected.shape[0] // len(sources),) + tuple(expected.shape[1:])
        absent = [name for name in sources if name not in state_dict]
        if absent:
            if target.startswith(may_lack) and len(absent) == len(sources):
                missing.append(target)
            else:  # the present parts (query, value) have their place: not reported as unknown
                consumed.update(name for name in sources if name in state_dict)
                problems.append(f"missing {_join(absent)} for {target!r} (expected shape {part}"
                                + (f", a third of {tuple(expected.shape)})" if len(sources) > 1 else ")"))
            continue
        consumed.update(sources)
        bad = [(name, tuple(state_dict[name].shape)) for name in sources if state_dict[name].shape != part]
        if bad:
            mismatched = True
            problems.extend(f"{name!r} -> {target!r}: expected shape {part}, got {shape}"
                            for name, shape in bad)
            continue
        converted[target] = torch.cat([state_dict[name] for name in sources]) if len(sources) > 1 \
            else state_dict[sources[0]]

    chosen = set(layers) if source in ("timm", "hf") else set()
    unused, unknown = [], []
    for key in state_dict:
        if key in consumed:
            continue
        if key in held or (key in block_of and block_of[key] not in chosen):
            unused.append(key)  # held back by ``keep``, or a block that is not head, shared or tail
        elif source == "hf" and re.match(r"^(?:vit\.)?pooler\.", key):
            unused.append(key)  # ViTModel's tanh pooler: the classifier reads [CLS] directly
        else:
            unknown.append(key)
    if unknown:
        problems.append(f"source keys with no place in this model (layer scale, qk-norm, register "
                        f"tokens, ... are not supported): {unknown}")
        if any("dora_" in key for key in unknown):
            problems.append("the DoRA adapters of the public code are not merged: call "
                            "model.mor_vit.merge_all_dora_weights() there and save again")
    if problems:
        hint = _fit_hint(state_dict, source, names, model) if mismatched and fit_hint else ""
        shown = problems if len(problems) <= 12 else problems[:10] + [f"... and {len(problems) - 10} more"]
        raise ValueError(f"checkpoint (source={source!r}) does not fit {type(model).__name__}; nothing "
                         f"was loaded." + (f" {hint}" if hint else "") + "\n  " + "\n  ".join(shown))
    return ConvertedCheckpoint(converted, missing, unused)


def read_state_dict(path: Union[str, os.PathLike]) -> dict:
    """Tensors from a safetensors file, a torch file (``weights_only``) or a sharded checkpoint's
    index (:func:`read_sharded_state_dict`), told apart by their bytes, with a top-level
    ``"state_dict"`` / ``"model"`` entry unwrapped and a DDP ``"module."`` prefix removed. Errors
    name the file and what was expected."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path={path!r}: a directory, expected a checkpoint file (a public "
                                f"Edge-RecViT checkpoint directory loads with recvit.from_pretrained)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path={path!r}: no such checkpoint file")
    kind = file_format(path)
    if kind == "index":
        return read_sharded_state_dict(path)
    return unwrap_state_dict(_read_weights_file(path, kind), path)


def _read_weights_file(path: str, kind: str):
    """What the safetensors or torch file ``path`` holds, as saved (``kind``: its :func:`file_format`)."""
    if kind == "torch":
        return read_torch_file(path)
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError and others
        raise ValueError(f"{path}: a safetensors file that cannot be read (truncated or corrupt?): "
                         f"{type(error).__name__}: {error}") from None


def unwrap_state_dict(state, path: str) -> dict:
    """The state dict in what was read from ``path``: a top-level ``"state_dict"`` / ``"model"``
    entry unwrapped (a training checkpoint's model), a DDP ``"module."`` prefix removed; a
    ValueError naming ``path`` for anything but a mapping."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"path={path!r}: expected a state dict (a mapping of names to tensors), "
                         f"got {type(state).__name__}")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def read_torch_file(path: str):
    """``torch.load(path, weights_only=True)`` on the CPU; a ValueError naming the file says why a file
    cannot be read (corrupt, truncated, or holding objects other than tensors)."""
    try:
        with open(path, "rb") as file:  # a file object: torch.load must not go by the name either
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise ValueError(f"{path}: a torch file holding more than tensors, which weights_only=True "
                             f"refuses (a whole pickled model or objects of other classes?); recvit reads "
                             f"state dicts only: save model.state_dict() instead"
                             f"{_unsupported_global(error)}") from None
        # torch's message suggests weights_only=False, which would run the file's code: not quoted
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        raise ValueError(f"{path}: a torch file that cannot be read (truncated or corrupt?): its pickle is "
                         f"invalid" + (f" ({detail.group(1).strip()})" if detail else "")) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... for bad files
        raise ValueError(f"{path}: a torch file that cannot be read (truncated or corrupt?): "
                         f"{type(error).__name__}: {error}") from None


def file_format(path: Union[str, os.PathLike]) -> str:
    """'safetensors', 'torch' or 'index' from the file's first bytes (never its name); ValueError
    naming the file otherwise. safetensors: an 8-byte little-endian header length (at most 100 MB),
    then a JSON header; torch: a zip archive (``torch.save``'s default) or a legacy pickle (protocol
    byte 0x80); index: a JSON object (a sharded checkpoint's ``*.index.json``)."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        head = file.read(9)
    size = os.path.getsize(path)
    # safetensors caps its header at 100 MB; a truncated file still starts like one (its reader says why).
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= 100_000_000:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "torch"
    if head.lstrip()[:1] == b"{":
        return "index"
    raise ValueError(f"{path}: not a checkpoint file recvit can read: expected safetensors (an 8-byte header "
                     f"length, then a JSON header), a torch file (a zip archive or a pickle) or a sharded "
                     f"checkpoint's index (JSON), but the file ({size} bytes) starts with {head[:8]!r}")


def load_checkpoint(model: nn.Module, path_or_state_dict, source: str = "auto",
                    layers: Optional[Sequence[int]] = None, keep: Sequence[str] = ()) -> ConvertedCheckpoint:
    """Convert (see :func:`convert_state_dict`), check every key and shape, then copy into ``model``.

    ``path_or_state_dict``: a safetensors / torch file path, or a sharded checkpoint's
    ``*.index.json`` with its shards beside it (the format is read from the file's bytes; see
    :func:`read_state_dict`), or a state dict. Returns the :class:`ConvertedCheckpoint` (its ``missing`` lists what
    kept its initialisation).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        state = read_state_dict(path)
        try:
            converted = convert_state_dict(state, model, source, layers, keep)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    elif isinstance(path_or_state_dict, Mapping):
        converted = convert_state_dict(path_or_state_dict, model, source, layers, keep)
    else:
        raise TypeError(f"path_or_state_dict: expected a file path or a state dict, got "
                        f"{type(path_or_state_dict).__name__}")
    result = model.load_state_dict(converted.state_dict, strict=False)
    assert not result.unexpected_keys and sorted(result.missing_keys) == sorted(converted.missing)
    return converted


def save_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model.state_dict()`` to ``path``: safetensors for ``.safetensors``, ``torch.save``
    for ``.pt`` / ``.pth`` / ``.bin``; any other extension is refused. :func:`load_checkpoint`
    reads either back (``source="recvit"``, detected)."""
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in SAFETENSORS_EXTENSIONS + TORCH_EXTENSIONS:
        raise ValueError(f"path={path!r}: expected the extension .safetensors (safetensors) or one of "
                         f"{', '.join(TORCH_EXTENSIONS)} (torch.save), got {extension or 'none'!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"path={path!r}: a directory, expected a file name to write")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path={path!r}: the folder {folder} does not exist (create it first)")
    tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    if extension in SAFETENSORS_EXTENSIONS:
        from safetensors.torch import save_file
        save_file(tensors, path, metadata={"format": "pt", "source": "recvit"})
    else:
        torch.save(tensors, path)


def from_pretrained(path: Union[str, os.PathLike], kv: str = "all", backend: Optional[str] = None) -> nn.Module:
    """Build the Edge-RecViT of a public Edge-RecViT checkpoint directory and load its weights.

    ``path``: the directory the public code's ``save_pretrained`` writes: ``config.json`` (its
    ``MoRViTConfig``: hidden size, heads, layers = L, intermediate size, activation, image and patch
    size, labels, layer_norm_eps) and the weights, looked for in transformers' order:
    ``model.safetensors``, ``model.safetensors.index.json`` (sharded, ``save_pretrained(max_shard_size=
    ...)``), ``pytorch_model.bin``, ``pytorch_model.bin.index.json``. The model gets the public code's
    three-layer ranker (``ranker="public_3layer"``), LayerNorm eps from the config and ``kv="all"``,
    which is what the public forward computes: every token is a key at every step. The result is the
    public code's evaluation path (``training=False``: argmax depths, no sampling, no Gumbel noise),
    returned in eval mode.

    As the public code computes them: ``hidden_act`` "gelu" is the exact GELU and anything else
    ReLU (its ``MoRViTBlock``: "gelu_new" included); ``intermediate_size`` is the MLP width whatever
    its ratio to the width; ``use_abs_pos_emb: false`` adds no positions (``pos_embed`` is loaded as
    zeros: x + 0 is exact; freeze it, ``model.pos_embed.requires_grad_(False)``, to fine-tune the same
    function); an ``image_size`` off the patch grid leaves the last ``image_size % patch_size`` pixel
    rows and columns unread (the public convolution drops them too).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path={path!r}: expected a directory with config.json and model.safetensors "
                                f"(or pytorch_model.bin, or a sharded checkpoint's index)")
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_path}: no such file; from_pretrained needs the public code's "
                                f"config.json beside the weights") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not a JSON file: {error}") from None
    if not isinstance(config, dict) or config.get("model_type") != "mor_vit":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path}: model_type {kind!r}: expected 'mor_vit' (the public Edge-RecViT "
                         f"code's config)")
    config = {**_PUBLIC_CONFIG, **config}
    model = _public_model(config, config_path, kv, backend)
    candidates = [os.path.join(path, name) for name in PUBLIC_WEIGHTS]
    weights = next((name for name in candidates if os.path.isfile(name)), None)
    if weights is None:
        raise FileNotFoundError(f"path={path!r}: no weights: expected one of {', '.join(PUBLIC_WEIGHTS)} there")
    state = read_state_dict(weights)
    if not config["use_abs_pos_emb"]:
        state = _zero_positions(state, model, config_path, weights)
    try:
        converted = _convert_state_dict(state, model, "public", None, (), fit_hint=False)
    except ValueError as error:
        raise ValueError(f"{weights}: the weights do not fit the model {config_path} describes: {error}") from None
    model.load_state_dict(converted.state_dict)
    return model.eval()


def read_sharded_state_dict(index_path: Union[str, os.PathLike]) -> dict:
    """Tensors of a sharded checkpoint: the index JSON that transformers' ``save_pretrained(
    max_shard_size=...)`` writes (``{"metadata": {...}, "weight_map": {key: shard file name}}``)
    and the shard files beside it (safetensors or torch). Every key the index lists must be in its
    shard under the same name, and a shard may hold no other key; a DDP ``"module."`` prefix on
    every key is removed from the merged state. Errors name the index or the shard."""
    index_path = os.fspath(index_path)
    try:
        with open(index_path, encoding="utf-8") as file:
            index = json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{index_path}: no such shard index") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index_path}: not a JSON file: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(shard, str) for shard in weight_map.values())):
        raise ValueError(f"{index_path}: expected a shard index, a JSON object whose 'weight_map' maps "
                         f"parameter names to shard file names")
    folder, state = os.path.dirname(index_path), {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or shard in (".", ".."):
            raise ValueError(f"{index_path}: shard {shard!r}: expected a file name beside the index")
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{index_path}: lists the shard {shard!r}, which {folder or '.'} lacks")
        kind = file_format(shard_path)
        if kind == "index":
            raise ValueError(f"{index_path}: lists the shard {shard!r}, which is an index itself, not weights")
        tensors = _read_weights_file(shard_path, kind)
        if not isinstance(tensors, Mapping):
            raise ValueError(f"{shard_path}: expected a shard of {index_path} (a mapping of names to tensors), "
                             f"got {type(tensors).__name__}")
        listed = {key for key, name in weight_map.items() if name == shard}
        absent, unlisted = sorted(listed - set(tensors)), sorted(set(tensors) - listed)
        if absent or unlisted:
            found = [f"{what}: {keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                     for what, keys in (("listed there but not in the shard", absent),
                                        ("in the shard but not listed for it", unlisted)) if keys]
            raise ValueError(f"{shard_path}: does not match {index_path}: {'; '.join(found)}")
        state.update(tensors)
    return unwrap_state_dict(state, index_path)


def _public_model(config: dict, config_path: str, kv: str, backend: Optional[str]) -> nn.Module:
    """The EdgeRecViT a public config.json (defaults filled in) describes; ValueError naming the
    file for one this package cannot build."""
    from .models.edge_recvit import EdgeRecViT

    if "num_labels" in config:
        num_classes = config["num_labels"]
    else:  # transformers' PretrainedConfig: num_labels = len(id2label), 2 without one
        num_classes = len(config["id2label"]) if config.get("id2label") else 2
    try:
        return EdgeRecViT(img_size=config["image_size"], patch_size=config["patch_size"],
                          in_chans=config["num_channels"], num_classes=num_classes, embed_dim=config["hidden_size"],
                          num_heads=config["num_attention_heads"], num_steps=config["num_hidden_layers"],
                          qkv_bias=config["qkv_bias"], eps=config["layer_norm_eps"], kv=kv, backend=backend,
                          ranker="public_3layer", mlp_hidden_dim=config["intermediate_size"],
                          mlp_activation="gelu" if config["hidden_act"] == "gelu" else "relu")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: cannot build the model it describes: {error}") from None


def _zero_positions(state: dict, model: nn.Module, config_path: str, weights: str) -> dict:
    """``state`` with zero position embeddings under the public key (its model adds none)."""
    key = _public_source_names("pos_embed", state)[0]
    if key in state:
        raise ValueError(f"{weights}: holds {key!r}, but {config_path} sets use_abs_pos_emb false (the public "
                         f"model then has no position embeddings)")
    return {**state, key: torch.zeros(model.pos_embed.shape)}


def _check_state_dict(state_dict) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, "
                        f"got {type(state_dict).__name__}")
    bad = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"state_dict: expected tensors only, these entries are not: {bad[:10]}")


def _refuse_distilled(state_dict) -> None:
    found = [key for key in state_dict
             if key.split(".")[0] in ("dist_token", "head_dist") or "distillation" in key]
    if found:
        raise ValueError(f"state_dict: a distilled DeiT checkpoint ({found[:4]}) is not supported: its "
                         f"blocks were trained with a second (distillation) token, so dropping it changes "
                         f"the function. Use a non-distilled DeiT/ViT, as the Edge-RecViT paper does.")


def _check_layers(layers, state_dict, source) -> tuple:
    pattern = _TIMM_BLOCK if source == "timm" else _HF_BLOCK
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    count = max(indices) + 1 if indices else 0
    if (not isinstance(layers, (tuple, list)) or len(layers) != 3
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise ValueError(f"layers={layers!r}: expected three source block indices (head, shared, tail)")
    outside = [i for i in layers if i not in indices]
    if outside:
        raise ValueError(f"layers={tuple(layers)!r}: source block(s) {outside} do not exist; the source has "
                         f"{count} blocks (0..{count - 1})")
    return tuple(layers)


def _source_names(target: str, layers, source, state_dict) -> list:
    """The source key(s) that hold model key ``target`` (three for HF's split q/k/v)."""
    block, rest = None, target
    if target.startswith("recursion."):
        role, rest = target[len("recursion."):].split(".", 1)
        block = layers[ROLES.index(role)] if role in ROLES else None
        if block is None:
            return [target]
    elif match := _TIMM_BLOCK.match(target):  # an early-exit ViT's block i: the source's block i
        block, rest = int(match.group(1)), target[match.end():]
    if source == "timm":
        return [target if block is None else f"blocks.{block}.{rest}"]
    prefix = "vit." if any(key.startswith("vit.") for key in state_dict) else ""
    if block is None:
        if target in _HF_CLASSIFIER:
            return [_HF_CLASSIFIER[target]]
        return [prefix + _HF_TOP.get(target, target)]
    layer = f"{prefix}encoder.layer.{block}."
    module, param = rest.rsplit(".", 1)
    if module == "attn.qkv":
        return [f"{layer}attention.attention.{name}.{param}" for name in _HF_QKV]
    return [f"{layer}{_HF_IN_BLOCK.get(module, module)}.{param}"]


def _unsupported_global(error: Exception) -> str:
    """torch's 'Unsupported global: GLOBAL module.Class' line of a weights_only refusal, if any."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return f" (it holds a {match.group(1)})" if match else ""


def _check_public_ranker(model: nn.Module) -> None:
    from .models.edge_recvit import ThreeLayerRanker

    if not isinstance(getattr(model, "ranker", None), ThreeLayerRanker):
        raise ValueError(f"state_dict: a checkpoint of the public Edge-RecViT code, whose router has three "
                         f"layers: it loads into an EdgeRecViT built with ranker='public_3layer' (this is "
                         f"{type(model).__name__} with {type(getattr(model, 'ranker', None)).__name__}); "
                         f"recvit.from_pretrained(directory) builds it from the checkpoint's config.json")


def _public_source_names(target: str, state_dict) -> list:
    """The public-code key(s) that hold model key ``target`` (three for the split q/k/v)."""
    prefix = "mor_vit." if any(key.startswith("mor_vit.") for key in state_dict) else ""
    if target in _HF_CLASSIFIER:
        return [_HF_CLASSIFIER[target]]
    if not target.startswith("recursion."):
        return [prefix + _PUBLIC_TOP.get(target, target)]
    role, rest = target[len("recursion."):].split(".", 1)
    block = f"{prefix}block_{role.removesuffix('_layer')}."
    module, param = rest.rsplit(".", 1)
    if module == "attn.qkv":
        return [f"{block}attention.{name}.{param}" for name in _HF_QKV]
    return [f"{block}{_PUBLIC_IN_BLOCK.get(module, module)}.{param}"]


def _fit_hint(state_dict, source: str, names: dict, model: nn.Module) -> str:
    """'its shapes fit <model>, ...' from the checkpoint's width, tokens, classes and depth count."""
    from .models.edge_recvit import EdgeRecViT
    from .models.registry import create_model, list_models

    def shape(target, dim):
        sources = names.get(target) or [None]
        value = state_dict.get(sources[0])
        return value.shape[dim] if isinstance(value, torch.Tensor) and value.dim() > dim else None

    width, tokens, classes = shape("cls_token", 2), shape("pos_embed", 1), shape("head.weight", 0)
    patch = shape("patch_embed.proj.weight", 3)
    if width is None:
        return ""
    found = {"embed_dim": width}
    if tokens and patch and round((tokens - 1) ** 0.5) ** 2 == tokens - 1:
        found["img_size"] = round((tokens - 1) ** 0.5) * patch
    if patch:
        found["patch_size"] = patch
    if classes:
        found["num_classes"] = classes
    fits = []
    for name in list_models():
        try:
            with torch.device("meta"):
                candidate = create_model(name)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            continue  # a model that cannot be built without memory is left out of the hint
        if getattr(candidate, "embed_dim", None) != width:
            continue
        if source == "recvit" and set(candidate.state_dict()) != set(state_dict):
            continue
        if source == "public" and not isinstance(candidate, EdgeRecViT):
            continue  # the public code's model is an Edge-RecViT
        changed = {key: value for key, value in found.items() if key != "embed_dim" and (
            getattr(candidate, key, None) if key == "num_classes" else getattr(candidate.patch_embed, key)) != value}
        if source == "public":
            changed["ranker"] = "public_3layer"
        args = "".join(f", {key}={value!r}" for key, value in changed.items())
        fits.append(f"create_model({name!r}{args})")
    what = ", ".join(f"{key} {value}" for key, value in found.items())
    if not fits:
        return f"The checkpoint's shapes ({what}) fit none of the registered models ({', '.join(list_models())})."
    # this model's settings that differ (a classifier of another size is not a width problem)
    patch_embed = getattr(model, "patch_embed", None)
    mine = {"embed_dim": getattr(model, "embed_dim", "?"), "num_classes": getattr(model, "num_classes", None),
            "img_size": getattr(patch_embed, "img_size", None), "patch_size": getattr(patch_embed, "patch_size", None)}
    differ = [f"{key} {mine[key]}" for key in found if mine[key] is not None and mine[key] != found[key]]
    has = ", ".join(differ) if differ else f"embed_dim {mine['embed_dim']}"
    return f"The checkpoint's shapes ({what}) fit {' or '.join(fits)}; this model has {has}."


def _join(names) -> str:
    return ", ".join(repr(name) for name in names)
