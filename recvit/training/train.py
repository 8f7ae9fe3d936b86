"""``recvit train`` (also ``python -m recvit train``, under torchrun too): fine-tune (or train
from scratch) an Edge-RecViT on an ImageFolder, on one process or under torchrun (DDP: NCCL on GPUs,
Gloo on CPUs).

The recipe follows the paper and its supplement: start from a DeiT/ViT checkpoint (timm or Hugging
Face; source blocks ``--layers HEAD SHARED TAIL`` become the recursive block), a recvit checkpoint,
or from scratch; AdamW with a linear warm-up then cosine decay per step; label smoothing; gradient
clipping; the loss CCE + 1e-3 STB + 0.1 DU (:class:`recvit.EdgeRecViTLoss`); no MixUp/CutMix (the
paper leaves label mixing out); bf16 autocast on GPUs. ``--freeze-epochs K`` runs the supplement's
two-stage schedule (its CIFAR recipe): for the first K epochs the head, shared and tail layers are
frozen and only the patch embedding ([CLS] and positions with it), the ranker and the classifier
(final norm and head) learn; then everything trains. Each stage gets its own warm-up and cosine
decay ("the same optimisation settings").

Every epoch, process 0 writes ``OUTPUT/last.pt`` (model, optimizer, scheduler, epoch, every process's
RNG state), appends a line to ``OUTPUT/metrics.jsonl`` and redraws ``OUTPUT/plot.png`` (loss, accuracy
and the depth histogram per epoch; needs matplotlib). ``--resume`` continues from ``last.pt`` exactly:
the same weights as a run that was never stopped (sampling order and each image's augmentation
depend only on the seed, the epoch and the image). ``--stop-after N`` stops after N optimiser steps
(mid-epoch too) and writes the checkpoint there. At the end ``OUTPUT/model.safetensors`` holds the
weights alone. An OUTPUT that holds a run already is refused unless ``--resume`` continues it or
``--overwrite`` deletes its files first.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from . import distributed
from ..models.edge_recvit import RANKERS
from ..models.losses import EdgeRecViTLoss
from .data import find_classes
from .evaluate import CHECKPOINT, autocast, build_model, evaluate, read_training_checkpoint, shard_loader

FROZEN_IN_STAGE_1 = ("recursion.", "blocks.")  # the transformer layers: head, shared and tail, or the L blocks
# What a run writes into OUTPUT: an existing run is continued (--resume) or replaced (--overwrite), never mixed.
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "config.json", "plot.png", "model.safetensors")
# Settings a resumed run may change: they do not alter the trajectory.
RUN_CONTROL = ("data", "output", "workers", "stop_after", "no_progress", "no_plot", "resume", "overwrite")


def _parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The command line; with ``suppress`` only the arguments actually given appear in the result."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    p = argparse.ArgumentParser(
        prog="recvit train", argument_default=argparse.SUPPRESS if suppress else None,
        description="Fine-tune an Edge-RecViT on an ImageFolder (torchrun for several processes).")
    p.add_argument("--data", default=default(None),
                   help="ImageFolder root: DATA/train/<class>/<image> (and DATA/val/... for validation)")
    p.add_argument("--output", default=default("runs/recvit"), help="run folder (default: %(default)s)")
    p.add_argument("--model", default=default("edge_recvit_small"), help="model name (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=default(None), help="input resolution (default: the model's)")
    p.add_argument("--patch-size", type=int, default=default(None), help="patch size (default: the model's)")
    p.add_argument("--kv", choices=("active", "all"), default=default(None),
                   help="attention mode (default: the model's, active)")
    p.add_argument("--ranker", choices=tuple(RANKERS), default=default(None),
                   help="depth ranker: earr (the paper's) or public_3layer (the public code's, which its "
                   "checkpoints need for --init) (default: the model's, earr)")
    p.add_argument("--backend", default=default(None),
                   help="kernel backend (default: auto = packed on the CPU)")
    p.add_argument("--init", default=default(None),
                   help="start from this checkpoint: DeiT/ViT (timm or Hugging Face), recvit .safetensors or a "
                   "`recvit train` checkpoint (default: from scratch); a classifier of another size is re-initialised")
    p.add_argument("--layers", type=int, nargs=3, default=default([0, 6, 11]), metavar=("HEAD", "SHARED", "TAIL"),
                   help="DeiT/ViT source blocks of the head, shared and tail layers (default: 0 6 11)")
    p.add_argument("--epochs", type=int, default=default(300), help="total epochs, both stages (default: %(default)s)")
    p.add_argument("--freeze-epochs", type=int, default=default(0),
                   help="stage 1 of the two-stage schedule: epochs with head/shared/tail frozen (default: 0)")
    p.add_argument("--batch-size", type=int, default=default(32), help="images per process and step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=default(None),
                   help="peak learning rate (default: DeiT's 5e-4 * global batch / 512)")
    p.add_argument("--min-lr", type=float, default=default(1e-5), help="end of the cosine (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=default(5.0),
                   help="linear warm-up per stage, in epochs (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=default(0.05),
                   help="AdamW weight decay; none on biases, norms, [CLS] and positions (default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=default(0.1), help="(default: %(default)s)")
    p.add_argument("--clip-grad", type=float, default=default(1.0),
                   help="max gradient norm; 0 disables (default: %(default)s)")
    p.add_argument("--lambda-stb", type=float, default=default(1e-3), help="STB loss weight (default: %(default)s)")
    p.add_argument("--lambda-du", type=float, default=default(0.1), help="DU loss weight (default: %(default)s)")
    p.add_argument("--min-scale", type=float, default=default(0.08),
                   help="smallest area of the random resized crop (default: %(default)s)")
    p.add_argument("--workers", type=int, default=default(4), help="data-loader workers per process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=default(0), help="(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=default("auto"))
    p.add_argument("--no-amp", action="store_true", default=default(False),
                   help="fp32 on GPUs too (default: bf16 autocast on GPUs)")
    p.add_argument("--resume", nargs="?", const="", default=default(None), metavar="CHECKPOINT",
                   help="continue a run (default checkpoint: OUTPUT/last.pt); its settings are reused")
    p.add_argument("--overwrite", action="store_true", default=default(False),
                   help="start afresh in an OUTPUT that holds a run, deleting that run's files "
                   f"({', '.join(RUN_FILES)}) (default: refuse such an OUTPUT)")
    p.add_argument("--stop-after", type=int, default=default(None), metavar="STEPS",
                   help="stop after this many optimiser steps in all, writing the checkpoint there")
    p.add_argument("--no-progress", action="store_true", default=default(False), help="no progress bar")
    p.add_argument("--no-plot", action="store_true", default=default(False), help="do not draw plot.png")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line; with ``--resume`` the checkpoint's settings fill in (a setting
    given here that differs from the checkpoint's is an error, except the run-control ones)."""
    parser = _parser()
    args = parser.parse_args(argv)
    given = vars(_parser(suppress=True).parse_args(argv))
    if args.resume is not None:
        if args.overwrite:
            parser.error("argument --overwrite: not with --resume (--resume continues the run, --overwrite "
                         "deletes it)")
        path = args.resume or os.path.join(args.output, CHECKPOINT)
        if os.path.isdir(path):
            parser.error(f"argument --resume: {path} is a directory, expected a `recvit train` checkpoint "
                         f"file (OUTPUT/{CHECKPOINT})")
        if not os.path.isfile(path):
            parser.error(f"argument --resume: no such checkpoint: {path}")
        try:
            state = read_training_checkpoint(path)
        except ValueError as error:  # unreadable: the message names the file and why
            parser.error(f"argument --resume: {error}")
        if state is None:
            parser.error(f"argument --resume: {path} is not a `recvit train` checkpoint (no 'args')")
        saved = state["args"]
        changed = [f"--{key.replace('_', '-')} ({given[key]!r}, the checkpoint has {saved.get(key)!r})"
                   for key in given if key not in RUN_CONTROL and given[key] != saved.get(key)]
        if changed:
            parser.error(f"argument --resume: these settings differ from the checkpoint's and would change "
                         f"the run: {', '.join(changed)}")
        # run-control settings not given are the checkpoint's, except --stop-after (once only); a setting
        # the checkpoint predates keeps its default
        args = argparse.Namespace(**{**vars(args), **saved, "stop_after": None, "overwrite": False,
                                     **{key: given[key] for key in given if key in RUN_CONTROL}, "resume": path})
    _check(parser, args)
    return args


def _check(parser, args) -> None:
    if args.data is None:
        parser.error("argument --data: required (an ImageFolder root with train/<class>/ folders)")
    if not os.path.isdir(os.path.join(args.data, "train")):
        parser.error(f"argument --data: no train folder: {os.path.join(args.data, 'train')}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    for name in ("freeze_epochs", "workers", "warmup_epochs", "weight_decay", "clip_grad", "min_lr",
                 "lambda_stb", "lambda_du"):
        if not 0 <= getattr(args, name) < math.inf:  # NaN and inf too
            parser.error(f"argument --{name.replace('_', '-')}: expected a finite number >= 0, got "
                         f"{getattr(args, name)}")
    if args.freeze_epochs >= args.epochs:
        parser.error(f"argument --freeze-epochs: expected fewer than --epochs ({args.epochs}), "
                     f"got {args.freeze_epochs}")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"argument --label-smoothing: expected in [0, 1), got {args.label_smoothing}")
    if not 0 < args.min_scale <= 1:
        parser.error(f"argument --min-scale: expected in (0, 1], got {args.min_scale}")
    if args.lr is not None and not 0 < args.lr < math.inf:
        parser.error(f"argument --lr: expected a finite number > 0, got {args.lr}")
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"argument --stop-after: expected >= 1, got {args.stop_after}")
    if args.init is not None and args.resume is None and not os.path.isfile(args.init):
        if os.path.isdir(args.init):
            parser.error(f"argument --init: {args.init} is a directory, expected a checkpoint file")
        parser.error(f"argument --init: no such file: {args.init}")
    try:
        classes = find_classes(os.path.join(args.data, "train"))
    except ValueError as error:
        parser.error(f"argument --data: {str(error).removeprefix('root: ')}")
    if len(classes) < 2:
        parser.error(f"argument --data: {os.path.join(args.data, 'train')} has one class folder "
                     f"({classes[0]!r}): classification needs at least 2 classes")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"argument --output: {args.output} is a file, expected a run folder")
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(args.output, name))]
    if existing and args.resume is None and not args.overwrite:
        parser.error(f"argument --output: {args.output} holds a run ({', '.join(existing)}): continue it with "
                     f"--resume, start afresh with --overwrite (deletes those files), or pick another --output")
    try:
        with torch.device("meta"):  # the model's settings checked before any work, without memory
            build_model(args.model, len(classes), args.img_size, args.patch_size, args.kv, args.backend,
                        args.ranker)
    except ValueError as error:
        parser.error(f"argument --model/--img-size/--patch-size/--backend: {error}")


# ----------------------------------------------------------------------------------------------
# Schedule, parameter groups, sampling


class WarmupCosine:
    """LR factor at optimiser step ``step``: per stage, linear warm-up to 1, then cosine to ``floor``."""

    def __init__(self, stage_steps: Sequence[int], warmup_steps: int, floor: float):
        self.stage_steps, self.warmup_steps, self.floor = list(stage_steps), warmup_steps, floor

    def __call__(self, step: int) -> float:
        for length in self.stage_steps:
            if step < length:
                break
            step -= length
        warmup = min(self.warmup_steps, length)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, length - warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices only (timm's rule: not on biases, norms, [CLS], positions)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Resumable(Sampler):
    """A DistributedSampler's order for the epoch with its first ``skip`` indices left out."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate(),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2])}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    model: nn.Module           # the trained model (not DDP-wrapped), on its device
    history: list = field(default_factory=list)  # one metrics dict per finished epoch
    stopped_at: Optional[int] = None  # the optimiser step of --stop-after, if it stopped there


def run(args: argparse.Namespace) -> TrainResult:
    """Train as ``args`` (from :func:`parse_args`) says; joins torchrun's process group if there is one."""
    context = distributed.setup(args.device)
    try:
        return _train(args, context)
    finally:
        distributed.teardown()


def _log(context, *parts) -> None:
    if context.is_main:
        print(*parts, flush=True)


def _build(args, context):
    from .data import SeededSamples, image_folder

    classes = find_classes(os.path.join(args.data, "train"))
    model = build_model(args.model, len(classes), args.img_size, args.patch_size, args.kv, args.backend,
                        args.ranker)
    size = model.patch_embed.img_size
    train_set = SeededSamples(image_folder(os.path.join(args.data, "train"), size, True, args.min_scale), args.seed)
    val_root = os.path.join(args.data, "val")
    val_set = image_folder(val_root, size, False) if os.path.isdir(val_root) else None
    if val_set is not None and val_set.classes != train_set.dataset.classes:
        raise ValueError(f"data: the class folders of {val_root} differ from those of train/")
    return model, train_set, val_set


def load_init(model: nn.Module, path: str, layers: Sequence[int] = (0, 6, 11)) -> str:
    """Load ``path`` (DeiT/ViT in timm's or Hugging Face's format, or a recvit checkpoint; see
    :func:`recvit.load_checkpoint`) into ``model``; a classifier of another size (a new label set)
    keeps its initialisation. Returns a line saying what kept its initialisation."""
    from ..checkpoint import load_checkpoint, read_state_dict

    state = read_state_dict(path)  # read once: the retry without the classifier uses it too
    try:
        loaded, note = load_checkpoint(model, state, layers=tuple(layers)), ""
    except ValueError as error:
        try:  # a label set of another size: everything but the classifier
            loaded = load_checkpoint(model, state, layers=tuple(layers), keep=("head.",))
        except ValueError:
            raise ValueError(f"{path}: {error}") from None
        note = f"; the classifier is re-initialised for {model.num_classes} classes"
    fresh = sorted({key.split(".")[0] for key in loaded.missing})
    return f"init: {path}" + (f" (kept their initialisation: {', '.join(fresh)})" if fresh else "") + note


def _train(args, context) -> TrainResult:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    model, train_set, val_set = _build(args, context)
    classes = train_set.dataset.classes
    if args.init is not None and args.resume is None:
        _log(context, load_init(model, args.init, args.layers))
    model.to(context.device)
    sampler = DistributedSampler(train_set, context.world_size, context.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size: {len(train_set)} training images over {context.world_size} process(es) "
                         f"make no full batch of {args.batch_size}")
    global_batch = args.batch_size * context.world_size
    lr = args.lr if args.lr is not None else 5e-4 * global_batch / 512
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr)
    stages = [args.freeze_epochs * steps_per_epoch] if args.freeze_epochs else []
    stages.append(args.epochs * steps_per_epoch - sum(stages))
    schedule = WarmupCosine(stages, round(args.warmup_epochs * steps_per_epoch), min(1.0, args.min_lr / lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    criterion = EdgeRecViTLoss(args.lambda_stb, args.lambda_du, args.label_smoothing)
    amp = not args.no_amp and context.device.type == "cuda"

    start_epoch, skip, history, running = 0, 0, [], None
    if args.resume is not None:
        state = read_training_checkpoint(args.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, skip, history = state["epoch"], state["step_in_epoch"], list(state["history"])
        if len(state["ranks"]) != context.world_size:
            raise ValueError(f"resume: the checkpoint was written by {len(state['ranks'])} process(es), this run "
                             f"has {context.world_size}; resume with the same number to continue exactly")
        mine = state["ranks"][context.rank]
        _set_rng_state(mine["rng"], context.device)
        running = mine["running"].to(context.device) if skip else None
        _log(context, f"resumed from {args.resume}: epoch {start_epoch + 1}, step {skip} of {steps_per_epoch}")
    if context.is_main:
        os.makedirs(args.output, exist_ok=True)
        if args.overwrite:  # the old run's files go, so none of them outlives it beside the new one
            for name in RUN_FILES:
                if os.path.exists(os.path.join(args.output, name)):
                    os.remove(os.path.join(args.output, name))
        with open(os.path.join(args.output, "config.json"), "w") as handle:
            json.dump({**vars(args), "resolved_lr": lr, "world_size": context.world_size,
                       "steps_per_epoch": steps_per_epoch, "classes": classes}, handle, indent=1)
        _rewrite_metrics(args.output, history)
    _log(context, f"{args.model}: {len(train_set)} training images, {len(classes)} classes, "
         f"{context.world_size} process(es) on {context.device}, global batch {global_batch}, lr {lr:.3g}, "
         f"{steps_per_epoch} steps per epoch" + (", bf16 autocast" if amp else ""))

    num_steps = model.num_steps
    global_step = start_epoch * steps_per_epoch + skip
    wrapped, wrapped_stage = None, None
    for epoch in range(start_epoch, args.epochs):
        stage = 1 if epoch < args.freeze_epochs else 2
        if stage != wrapped_stage:  # (re)wrap: DDP registers the trainable parameters when built
            for name, param in model.named_parameters():
                param.requires_grad_(stage == 2 or not name.startswith(FROZEN_IN_STAGE_1))
            wrapped = (DistributedDataParallel(model, device_ids=[context.device.index]
                                               if context.device.type == "cuda" else None)
                       if context.distributed else model)
            wrapped_stage = stage
            if args.freeze_epochs:
                _log(context, f"stage {stage}: " + ("the transformer layers frozen" if stage == 1
                                                      else "every layer trains"))
        trainable = [param for param in model.parameters() if param.requires_grad]
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=_Resumable(sampler, skip * args.batch_size),
                            num_workers=args.workers, drop_last=True, pin_memory=context.device.type == "cuda")
        # images, summed total / cce / stb / du loss (per image), top-1 hits; then the depth histogram
        if running is None:
            running = torch.zeros(6 + num_steps, dtype=torch.float64, device=context.device)
        model.train()
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", initial=skip, total=steps_per_epoch,
                   disable=not context.is_main or args.no_progress, dynamic_ncols=True, leave=False)
        for step, (images, targets) in enumerate(bar, start=skip):
            images = images.to(context.device, non_blocking=True)
            targets = targets.to(context.device, non_blocking=True)
            with autocast(context.device, amp):
                out = wrapped(images, return_aux=True)
            losses = criterion(out, targets)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            if args.clip_grad > 0:
                nn.utils.clip_grad_norm_(trainable, args.clip_grad)
            optimizer.step()
            scheduler.step()
            global_step += 1
            batch = images.shape[0]
            with torch.no_grad():
                hits = (out.logits.argmax(1) == targets).sum()
                sums = torch.stack([losses.total, losses.cce, losses.stb, losses.du]).double() * batch
                histogram = torch.bincount(out.depths[:, 1:].reshape(-1) - 1, minlength=num_steps)
                running += torch.cat([running.new_tensor([batch]), sums, hits.double()[None], histogram.double()])
            if context.is_main and not args.no_progress and step % 10 == 0:
                bar.set_postfix(loss=f"{losses.total.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
            if args.stop_after is not None and global_step >= args.stop_after and step + 1 < steps_per_epoch:
                _save(args, context, model, optimizer, scheduler, epoch, step + 1, history, running, classes)
                _log(context, f"stopped after step {global_step} (--stop-after); --resume continues from "
                     f"{os.path.join(args.output, CHECKPOINT)}")
                return TrainResult(model, history, global_step)
        bar.close()
        seconds = time.perf_counter() - started
        totals = distributed.all_reduce_sum(running, context)
        count = totals[0].item()
        record = {"epoch": epoch + 1, "stage": stage, "step": global_step, "lr": scheduler.get_last_lr()[0],
                  "train_loss": totals[1].item() / count, "train_cce": totals[2].item() / count,
                  "train_stb": totals[3].item() / count, "train_du": totals[4].item() / count,
                  "train_top1": 100.0 * totals[5].item() / count,
                  "train_depth_histogram": [int(value) for value in totals[6:].tolist()],
                  "train_images_per_s": (steps_per_epoch - skip) * global_batch / seconds}
        if val_set is not None:
            metrics = evaluate(model, shard_loader(val_set, context, args.batch_size, args.workers), context, amp,
                               progress=not args.no_progress)
            record.update({f"val_{key}": value for key, value in metrics.items()})
        history.append(record)
        skip, running = 0, None
        _save(args, context, model, optimizer, scheduler, epoch + 1, 0, history, None, classes)
        if context.is_main:
            _append_metrics(args.output, record)
            if not args.no_plot:
                plot_history(history, os.path.join(args.output, "plot.png"), num_steps)
            _log(context, _summary(record))
        if args.stop_after is not None and global_step >= args.stop_after and epoch + 1 < args.epochs:
            _log(context, f"stopped after step {global_step} (--stop-after)")
            return TrainResult(model, history, global_step)
    if context.is_main:
        from ..checkpoint import save_checkpoint

        save_checkpoint(model, os.path.join(args.output, "model.safetensors"))
    return TrainResult(model, history)


def _save(args, context, model, optimizer, scheduler, epoch, step_in_epoch, history, running, classes) -> None:
    """Write OUTPUT/last.pt on process 0 (atomically), with every process's RNG state and running sums."""
    mine = {"rng": _rng_state(context.device),
            "running": running.cpu() if running is not None else torch.zeros(0, dtype=torch.float64)}
    ranks = distributed.gather_objects(mine, context)
    if not context.is_main:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "step_in_epoch": step_in_epoch, "history": history, "ranks": ranks,
             "args": vars(args), "classes": list(classes)}
    path = os.path.join(args.output, CHECKPOINT)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _append_metrics(output: str, record: dict) -> None:
    with open(os.path.join(output, "metrics.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _rewrite_metrics(output: str, history: list) -> None:
    """metrics.jsonl as the checkpoint knows it (a resumed run drops lines of epochs it will redo)."""
    with open(os.path.join(output, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)


def _summary(record: dict) -> str:
    text = (f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, train top-1 {record['train_top1']:.1f}%")
    if "val_top1" in record:
        text += (f", val top-1 {record['val_top1']:.1f}% top-5 {record['val_top5']:.1f}%, mean depth "
                 f"{record['val_mean_depth']:.2f}, {record['val_gflops_per_image']:.3f} GFLOPs/image")
    return text + f", {record['train_images_per_s']:.1f} img/s"


def plot_history(history: list, path: str, num_steps: int) -> bool:
    """Loss, accuracy and the depth histogram per epoch in one figure; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [record["epoch"] for record in history]
    fig, (loss_ax, acc_ax, depth_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train (CCE + STB + DU)")
    loss_ax.plot(epochs, [r["train_cce"] for r in history], "o--", label="train CCE")
    if "val_loss" in history[0]:
        loss_ax.plot(epochs, [r["val_loss"] for r in history], "s-", label="val CE")
    acc_ax.plot(epochs, [r["train_top1"] for r in history], "o-", label="train top-1")
    if "val_top1" in history[0]:
        acc_ax.plot(epochs, [r["val_top1"] for r in history], "s-", label="val top-1")
        acc_ax.plot(epochs, [r["val_top5"] for r in history], "s--", label="val top-5")
    key = "val_depth_histogram" if "val_depth_histogram" in history[0] else "train_depth_histogram"
    shares = np.array([np.array(r[key], dtype=float) / max(1, sum(r[key])) for r in history]).T
    image = depth_ax.imshow(shares, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                            extent=(epochs[0] - 0.5, epochs[-1] + 0.5, 0.5, num_steps + 0.5))
    fig.colorbar(image, ax=depth_ax, label="share of patch tokens")
    for ax, title, label in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "%"),
                             (depth_ax, f"depth histogram ({key.split('_')[0]})", "depth")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if ax is not depth_ax:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as error:  # data or checkpoint that does not fit (or a missing shard)
        print(f"recvit train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
