"""Checkpoint mapping: DeiT/ViT weights in timm's or Hugging Face's key format -> Edge-RecViT.

Three source blocks become the recursive block: ``layers=(a, b, c)`` maps source block ``a`` to
``recursion.head_layer``, ``b`` to ``recursion.shared_layer`` (run at steps 2..L-1) and ``c`` to
``recursion.tail_layer``. The public code uses (0, 6, 11); the supplement (Sec. 4.2) reports that
mappings drawn from deeper source layers fine-tune to consistently higher accuracy at every scale.
Patch embedding, [CLS], positions, final norm and classifier are mapped by name. What assigns the
depths (Edge-RecViT's ranker, MoR-ViT's router) has no counterpart in a ViT: it keeps its
initialisation and is reported in ``missing`` (:func:`no_source_prefixes`). The same mapping serves
MoR-ViT, whose layers are plain ViT layers (its gated update with g = 1 is the ViT update).

Refused, never guessed: distilled DeiT checkpoints (``dist_token``/``head_dist``; their blocks were
trained with a second token, so dropping it changes the function; the paper starts from the
non-distilled DeiT), and any source parameter of a chosen block or of the embedding/head that this
model has no place for (layer scale, qk-norm, register tokens, ...). Positions are not resized: the
model's image and patch size must match the source's. Hugging Face ViT uses LayerNorm eps 1e-12
where timm and this package use 1e-6; the state dict does not carry eps, build the model with
``eps=1e-12`` to reproduce a Hugging Face model exactly.

Every key and shape is checked before anything is copied: a checkpoint that does not fit raises a
ValueError naming the keys and shapes, and the model is left untouched.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, NamedTuple, Sequence, Union

import torch
import torch.nn as nn

SOURCES = ("auto", "timm", "hf", "recvit")
DEFAULT_LAYERS = (0, 6, 11)
ROLES = ("head_layer", "shared_layer", "tail_layer")
# Model parameters (top-level names) that a ViT has too; every other top-level module has no source.
VIT_NAMES = ("cls_token", "pos_embed", "patch_embed", "recursion", "norm", "head")

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


class ConvertedCheckpoint(NamedTuple):
    """state_dict: model key -> tensor, every shape checked against the model. missing: model keys
    the source does not provide (they keep their initialisation: the ranker or router, plus ``keep``).
    unused: source keys deliberately left out (blocks not chosen, the HF pooler, kept keys)."""

    state_dict: dict
    missing: list
    unused: list


def no_source_prefixes(model: nn.Module) -> tuple:
    """Key prefixes of ``model`` that a DeiT/ViT checkpoint cannot provide: its top-level modules
    outside :data:`VIT_NAMES` (``("ranker.",)`` for Edge-RecViT, ``("router.",)`` for MoR-ViT).
    Loading from timm / Hugging Face leaves them initialised and lists them in ``missing``."""
    names = {key.split(".", 1)[0] for key in model.state_dict() if "." in key}
    return tuple(sorted(f"{name}." for name in names - set(VIT_NAMES)))


def detect_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'recvit', 'timm' or 'hf' from the key names; ValueError if none fits."""
    keys = list(state_dict)
    if any(key.startswith("recursion.") for key in keys):
        return "recvit"
    if any(_TIMM_BLOCK.match(key) for key in keys):
        return "timm"
    if any(_HF_BLOCK.match(key) for key in keys):
        return "hf"
    raise ValueError(f"state_dict: cannot tell its key format (expected timm 'blocks.{{i}}.*', Hugging "
                     f"Face 'vit.encoder.layer.{{i}}.*' or recvit 'recursion.*'); first keys: {keys[:5]}")


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str = "auto",
                       layers: Sequence[int] = DEFAULT_LAYERS,
                       keep: Sequence[str] = ()) -> ConvertedCheckpoint:
    """Map a timm / Hugging Face ViT (or recvit) state dict onto ``model``'s keys and check it fits.

    ``layers``: source blocks for (head, shared, tail); ignored for ``source="recvit"``. ``keep``:
    model key prefixes that keep their initialisation instead of being loaded (``("head.",)`` for a
    new label set). Raises ValueError listing every missing, unknown or mis-shaped key.
    """
    _check_state_dict(state_dict)
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {SOURCES}")
    _refuse_distilled(state_dict)
    if source == "auto":
        source = detect_source(state_dict)
    targets = model.state_dict()
    if source == "recvit":
        names, block_of = {key: [key] for key in targets}, {}
    else:
        layers = _check_layers(layers, state_dict, source)
        names = {key: _source_names(key, layers, source, state_dict) for key in targets}
        pattern = _TIMM_BLOCK if source == "timm" else _HF_BLOCK
        block_of = {key: int(m.group(1)) for key in state_dict if (m := pattern.match(key))}

    if isinstance(keep, str) or not all(isinstance(prefix, str) for prefix in keep):
        raise ValueError(f"keep={keep!r}: expected a sequence of model key prefixes, e.g. ('head.',)")
    keep = tuple(keep)
    may_lack = no_source_prefixes(model) if source != "recvit" else ()  # a ViT has no ranker/router
    converted, missing, consumed, held, problems = {}, [], set(), set(), []
    for target, expected in targets.items():
        sources = names[target]
        if target.startswith(keep):
            missing.append(target)
            held.update(sources)
            continue
        absent = [name for name in sources if name not in state_dict]
        if absent:
            if target.startswith(may_lack) and len(absent) == len(sources):
                missing.append(target)
            else:
                problems.append(f"missing {_join(absent)} for {target!r} (expected shape "
                                f"{tuple(expected.shape)})")
            continue
        consumed.update(sources)
        # HF's query, key and value each fill a third of the qkv rows, in that order.
        part = (expected.shape[0] // len(sources),) + tuple(expected.shape[1:])
        bad = [(name, tuple(state_dict[name].shape)) for name in sources if state_dict[name].shape != part]
        if bad:
            problems.extend(f"{name!r} -> {target!r}: expected shape {part}, got {shape}"
                            for name, shape in bad)
            continue
        converted[target] = torch.cat([state_dict[name] for name in sources]) if len(sources) > 1 \
            else state_dict[sources[0]]

    chosen = set(layers) if source != "recvit" else set()
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
    if problems:
        raise ValueError(f"checkpoint (source={source!r}) does not fit {type(model).__name__}; nothing "
                         f"was loaded:\n  " + "\n  ".join(problems))
    return ConvertedCheckpoint(converted, missing, unused)


def read_state_dict(path: Union[str, os.PathLike]) -> dict:
    """Tensors from a ``.safetensors`` file, or a torch file (``weights_only``), with a top-level
    ``"state_dict"`` / ``"model"`` entry unwrapped and a DDP ``"module."`` prefix removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path={path!r}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
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


def load_checkpoint(model: nn.Module, path_or_state_dict, source: str = "auto",
                    layers: Sequence[int] = DEFAULT_LAYERS, keep: Sequence[str] = ()) -> ConvertedCheckpoint:
    """Convert (see :func:`convert_state_dict`), check every key and shape, then copy into ``model``.

    ``path_or_state_dict``: a ``.safetensors`` / torch file path or a state dict. Returns the
    :class:`ConvertedCheckpoint` (its ``missing`` lists what kept its initialisation).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state = read_state_dict(path_or_state_dict)
    elif isinstance(path_or_state_dict, Mapping):
        state = path_or_state_dict
    else:
        raise TypeError(f"path_or_state_dict: expected a file path or a state dict, got "
                        f"{type(path_or_state_dict).__name__}")
    converted = convert_state_dict(state, model, source, layers, keep)
    result = model.load_state_dict(converted.state_dict, strict=False)
    assert not result.unexpected_keys and sorted(result.missing_keys) == sorted(converted.missing)
    return converted


def save_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model.state_dict()`` to ``path`` as safetensors (loads back with ``source="recvit"``)."""
    from safetensors.torch import save_file
    tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", "source": "recvit"})


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


def _join(names) -> str:
    return ", ".join(repr(name) for name in names)
