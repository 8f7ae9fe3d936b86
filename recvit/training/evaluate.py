"""``recvit eval`` (also ``python -m recvit eval``, under torchrun too): top-1 / top-5 accuracy,
mean depth, the depth histogram, GFLOPs per image from the depths the ranker actually chose
(:func:`recvit.count_flops`) and images per second, on an ImageFolder split. Under torchrun each
process takes every world_size-th image; the sums are reduced.

Depth statistics count the patch tokens only ([CLS] always runs all L steps); GFLOPs count every token,
as :func:`recvit.count_flops` does. Images per second time the model's forward passes alone (data
loading excluded), synchronised on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from . import distributed
from ..bench.timer import timed_call
from ..checkpoint import (DEFAULT_LAYERS, convert_state_dict, file_format, load_checkpoint, read_state_dict,
                          read_torch_file, unwrap_state_dict)
from ..models.edge_recvit import RANKERS
from ..flops import count_flops


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on a GPU when ``amp``; nothing on the CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def shard_loader(dataset, context: distributed.Context, batch_size: int, workers: int) -> DataLoader:
    """Every ``world_size``-th image from this process's rank on, in order (no padding, so each image
    is counted once)."""
    shard = Subset(dataset, range(context.rank, len(dataset), context.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=context.device.type == "cuda")


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, context: distributed.Context, amp: bool = True,
             progress: bool = False) -> dict:
    """Metrics of ``model`` (an Edge-RecViT, not DDP-wrapped) on ``loader``'s images, summed over
    the processes: ``top1``, ``top5`` (%), ``loss`` (plain cross-entropy), ``mean_depth`` and
    ``depth_histogram`` (patch tokens), ``gflops_per_image``, ``images``, ``images_per_s``."""
    was_training = model.training
    model.eval()
    num_steps = model.num_steps
    # images, top-1 hits, top-5 hits, summed CE, summed FLOPs, forward seconds; then the histogram
    totals = torch.zeros(6, dtype=torch.float64)
    histogram = torch.zeros(num_steps, dtype=torch.float64)
    from tqdm import tqdm

    for images, targets in tqdm(loader, desc="eval", disable=not (progress and context.is_main),
                                leave=False, dynamic_ncols=True):
        images = images.to(context.device, non_blocking=True)
        targets = targets.to(context.device, non_blocking=True)
        with autocast(context.device, amp):
            out, seconds = timed_call(lambda: model(images, return_aux=True), context.device)
        logits = out.logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        batch = images.shape[0]
        totals += torch.tensor([batch, hits[:, 0].sum().item(), hits.any(1).sum().item(),
                                F.cross_entropy(logits, targets, reduction="sum").item(),
                                count_flops(model, out.depths).total * batch, seconds], dtype=torch.float64)
        histogram += torch.bincount(out.depths[:, 1:].reshape(-1).cpu() - 1, minlength=num_steps).double()
    model.train(was_training)
    local = (totals[0].item(), totals[5].item())  # this process's images and forward seconds
    totals = distributed.all_reduce_sum(totals, context)
    histogram = distributed.all_reduce_sum(histogram, context)
    count = max(totals[0].item(), 1.0)
    depths = torch.arange(1, num_steps + 1, dtype=torch.float64)
    tokens = max(histogram.sum().item(), 1.0)
    # the processes time their shards at the same time: the throughput is the sum of their rates
    rates = [images / seconds for images, seconds in distributed.gather_objects(local, context) if seconds > 0]
    return {
        "images": int(totals[0].item()),
        "top1": 100.0 * totals[1].item() / count,
        "top5": 100.0 * totals[2].item() / count,
        "loss": totals[3].item() / count,
        "mean_depth": float((histogram * depths).sum().item() / tokens),
        "depth_histogram": [int(value) for value in histogram.tolist()],
        "gflops_per_image": totals[4].item() / count / 1e9,
        "images_per_s": sum(rates),
    }


# ----------------------------------------------------------------------------------------------
# Models from the command line and from training checkpoints

MODEL_SETTINGS = ("model", "img_size", "patch_size", "kv", "ranker")  # what a training checkpoint fixes
CHECKPOINT = "last.pt"  # the checkpoint recvit train writes in its --output folder each epoch


def build_model(name: str, num_classes: int, img_size: Optional[int] = None, patch_size: Optional[int] = None,
                kv: Optional[str] = None, backend: Optional[str] = None, ranker: Optional[str] = None) -> nn.Module:
    """An Edge-RecViT or early-exit DeiT from the registry (``ValueError`` naming the setting that does
    not fit); a setting left None is the model's."""
    from ..models.registry import create_model, list_models

    models = [model for model in list_models()
              if model.startswith("edge_recvit") or model.endswith("_early_exit")]
    if name not in models:
        raise ValueError(f"model={name!r}: the recipe trains Edge-RecViT and early-exit DeiT; expected one of "
                         f"{models}")
    overrides = {key: value for key, value in (("img_size", img_size), ("patch_size", patch_size),
                                               ("kv", kv), ("backend", backend), ("ranker", ranker))
                 if value is not None}
    return create_model(name, num_classes=num_classes, **overrides)


def read_training_checkpoint(path: str) -> Optional[dict]:
    """The dict ``recvit train`` writes (model, optimizer, ..., ``args``, ``classes``), or None when
    ``path`` is another kind of checkpoint (safetensors, a plain state dict); a ValueError naming the
    file when it cannot be read."""
    if file_format(path) != "torch":
        return None
    state = read_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("args"), dict) and "model" in state:
        return state
    return None


def _other_label_set(path: str, model: nn.Module, layers, split: str) -> Optional[str]:
    """The error for a checkpoint file that fits ``model`` except for its classifier (another label
    set than ``split``'s class folders), else None."""
    try:
        state = read_state_dict(path)
        convert_state_dict(state, model, layers=tuple(layers), keep=("head.",))
    except (OSError, ValueError):  # unreadable, or more than the classifier differs: the load's error says
        return None
    weight = state.get("head.weight", state.get("classifier.weight"))
    has = "no classifier" if weight is None else f"a classifier for {weight.shape[0]} classes"
    return (f"{path} has {has}, but {split} has {model.num_classes} class folders: evaluate it on the "
            f"label set it was trained for, or fine-tune it on this one first (recvit train --init {path})")


@dataclasses.dataclass
class TrainedRun:
    """What a ``recvit train`` run fixes: ``weights`` (a file :func:`recvit.load_checkpoint` reads),
    ``settings`` (the :data:`MODEL_SETTINGS` its command line gave, None where the model's default),
    ``classes``, ``source`` (the file the settings come from) and ``state``: the weights' state dict
    where reading the settings read it already (``last.pt``), else None."""

    weights: str
    settings: dict
    classes: list
    source: str
    state: Optional[dict] = None

    def load(self, model: nn.Module, layers: Sequence[int] = DEFAULT_LAYERS):
        """:func:`recvit.load_checkpoint` of the run's weights into ``model``, reading ``weights`` only
        if ``state`` does not hold them; errors name ``weights``."""
        if self.state is None:
            return load_checkpoint(model, self.weights, layers=layers)
        try:
            return load_checkpoint(model, self.state, layers=layers)
        except ValueError as error:
            raise ValueError(f"{self.weights}: {error}") from None


def _training_config(path: str) -> Optional[dict]:
    """The ``config.json`` ``recvit train`` writes (its arguments and classes), or None when ``path``
    is missing or another config (a public Edge-RecViT checkpoint's, say)."""
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and all(key in config for key in MODEL_SETTINGS + ("classes",)):
        return config
    return None


def read_run(path: str) -> Optional[TrainedRun]:
    """The ``recvit train`` run ``path`` names: its output folder, its ``last.pt``, or its
    ``model.safetensors`` beside its ``config.json``; in a folder holding both the newer of
    ``model.safetensors`` and ``last.pt`` gives the weights. None when ``path`` is none of these (a
    plain weights file, a DeiT/ViT checkpoint, a public checkpoint directory, nothing)."""
    if os.path.isdir(path):
        candidates = [os.path.join(path, name) for name in ("model.safetensors", CHECKPOINT)]
        found = sorted((file for file in candidates if os.path.isfile(file)), key=os.path.getmtime)
        return next((run for run in map(read_run, reversed(found)) if run is not None), None)
    if not os.path.isfile(path):
        return None
    if path.endswith(".safetensors"):
        config_path = os.path.join(os.path.dirname(path), "config.json")
        config = _training_config(config_path)
        if config is None:
            return None
        return TrainedRun(path, {key: config[key] for key in MODEL_SETTINGS}, list(config["classes"]), config_path)
    state = read_training_checkpoint(path)
    if state is None:
        return None
    return TrainedRun(path, {key: state["args"].get(key) for key in MODEL_SETTINGS}, list(state["classes"]), path,
                      unwrap_state_dict(state, path))


def run_conflicts(run: TrainedRun, model: nn.Module, given: dict) -> Optional[str]:
    """Why the settings the user gave (``given``: ``model``, ``img_size``, ``patch_size``, ``ranker``;
    None where not given) contradict the run's model (built from ``run.settings``), or None."""
    ranker = next(name for name, cls in RANKERS.items() if type(model.ranker) is cls)
    built = {"model": run.settings["model"], "img_size": model.patch_embed.img_size,
             "patch_size": model.patch_embed.patch_size, "ranker": ranker}
    for key, value in given.items():
        if value is not None and value != built[key]:
            flag = "--" + key.replace("_", "-")
            return (f"argument {flag}: {value} contradicts the trained run, whose {key} is {built[key]} "
                    f"({run.source}); drop {flag}, the run sets it")
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recvit eval", description="Accuracy, depth, GFLOPs per image and images/s of an Edge-RecViT "
        "on an ImageFolder split (torchrun: each process takes a shard).")
    parser.add_argument("--data", required=True, help="ImageFolder root holding the split folder (ROOT/val/<class>/...)")
    parser.add_argument("--split", default="val", help="split folder under --data (default: %(default)s)")
    parser.add_argument("--checkpoint", required=True,
                        help="weights: a `recvit train` run (its output folder, last.pt, or model.safetensors "
                        "beside config.json: its model settings and classes are used), a recvit .safetensors, "
                        "or a DeiT/ViT checkpoint")
    parser.add_argument("--model", default=None,
                        help="model name (default: the trained run's, else edge_recvit_base)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution (default: the trained run's, else the model's)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="patch size (default: the trained run's, else the model's)")
    parser.add_argument("--kv", choices=("active", "all"), default=None,
                        help="attention mode (default: the trained run's, else the model's; may differ from the run's)")
    parser.add_argument("--ranker", choices=tuple(RANKERS), default=None,
                        help="depth ranker (default: the trained run's, else the model's, earr)")
    parser.add_argument("--layers", type=int, nargs=3, default=(0, 6, 11), metavar=("HEAD", "SHARED", "TAIL"),
                        help="source blocks of a DeiT/ViT checkpoint (default: 0 6 11)")
    parser.add_argument("--backend", default=None, help="kernel backend (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-amp", action="store_true", help="fp32 on GPUs too (default: bf16 autocast)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from .data import find_classes, image_folder

    if args.batch_size < 1 or args.workers < 0:
        parser.error(f"argument --batch-size / --workers: expected >= 1 / >= 0, got {args.batch_size} / {args.workers}")
    split = os.path.join(args.data, args.split)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"argument --json: the folder {os.path.dirname(os.path.abspath(args.json))} does not exist")
    if not os.path.exists(args.checkpoint):
        parser.error(f"argument --checkpoint: no such file or folder: {args.checkpoint}")
    try:
        trained = read_run(args.checkpoint)
    except ValueError as error:  # unreadable: the message names the file and why
        parser.error(f"argument --checkpoint: {error}")
    if trained is None and os.path.isdir(args.checkpoint):
        parser.error(f"argument --checkpoint: {args.checkpoint} is a folder but not a `recvit train` run "
                     f"(expected {CHECKPOINT}, or model.safetensors beside the run's config.json)")
    given = {key: getattr(args, key) for key in MODEL_SETTINGS}
    settings = dict(given)
    if trained is not None:
        settings = {**trained.settings, "kv": args.kv or trained.settings["kv"]}
    try:
        context = distributed.setup(args.device)
    except ValueError as error:
        parser.error(f"argument --device: {error}")
    try:
        try:
            classes = find_classes(split)
        except (FileNotFoundError, ValueError) as error:
            parser.error(f"argument --data/--split: {str(error).removeprefix('root: ')}")
        if trained is not None and trained.classes != classes:
            parser.error(f"argument --data: the classes of {split} ({len(classes)}: {classes[:5]}...) differ "
                         f"from the checkpoint's ({len(trained.classes)}: {trained.classes[:5]}...)")
        try:
            model = build_model(settings["model"] or "edge_recvit_base", len(classes), settings["img_size"],
                                settings["patch_size"], settings["kv"], args.backend, settings["ranker"])
        except (TypeError, ValueError) as error:
            parser.error(f"argument --model/--img-size/--patch-size/--ranker/--backend: {error}")
        conflict = trained is not None and run_conflicts(trained, model, {key: given[key] for key in MODEL_SETTINGS if key != "kv"})
        if conflict:
            parser.error(conflict)
        try:
            dataset = image_folder(split, model.patch_embed.img_size, train=False)
        except (FileNotFoundError, ValueError) as error:
            parser.error(f"argument --data/--split: {str(error).removeprefix('root: ')}")
        try:
            if trained is not None:
                trained.load(model, tuple(args.layers))
            else:
                load_checkpoint(model, args.checkpoint, layers=tuple(args.layers))
        except (OSError, ValueError, TypeError) as error:  # OSError: a shard its index lists is missing
            other_classes = _other_label_set(args.checkpoint, model, args.layers, split)
            parser.error(f"argument --checkpoint: {other_classes or error}")
        model.to(context.device)
        loader = shard_loader(dataset, context, args.batch_size, args.workers)
        metrics = evaluate(model, loader, context, amp=not args.no_amp, progress=not args.no_progress)
        if context.is_main:
            print(format_metrics(metrics, model.num_steps))
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(metrics, handle, indent=1)
    finally:
        distributed.teardown()
    return 0


def format_metrics(metrics: dict, num_steps: int) -> str:
    shares = [100.0 * value / max(sum(metrics["depth_histogram"]), 1) for value in metrics["depth_histogram"]]
    return "\n".join([
        f"images        {metrics['images']}",
        f"top-1         {metrics['top1']:.2f} %",
        f"top-5         {metrics['top5']:.2f} %",
        f"loss (CE)     {metrics['loss']:.4f}",
        f"mean depth    {metrics['mean_depth']:.2f} of L = {num_steps} (patch tokens)",
        "depths        " + " ".join(f"{d}:{share:.0f}%" for d, share in enumerate(shares, start=1)),
        f"GFLOPs/image  {metrics['gflops_per_image']:.3f} (from the actual depths)",
        f"images/s      {metrics['images_per_s']:.1f} (forward passes only)",
    ])


if __name__ == "__main__":
    sys.exit(main())
