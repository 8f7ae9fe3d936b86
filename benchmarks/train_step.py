"""A full training step (forward + backward + AdamW) of Edge-RecViT (packed, the eager reference)
against the dense DeiT of the same scale, timed interleaved on the present device.

    python -m benchmarks.train_step [--scale small] [--batch 8] [--img-size 224] [--profile paper]
                                    [--dtype fp32] [--rounds 9] [--out benchmarks/results/train-step]

Edge-RecViT runs with the depths of the named profile (``paper``: the supplement's sum alpha = 8.21,
sum alpha^2 = 6.64; ``ranker``: its own ranker's, random at initialisation) and the recipe's loss
(CCE with label smoothing + 1e-3 STB + 0.1 DU); DeiT with label-smoothed cross-entropy. Every
implementation has its own weights and AdamW. One step of each per round, in turn; the ratios
are taken within a round (so a change of machine load reaches both sides), and reported as the
median with the 25th-75th percentiles. ``--dtype bf16`` runs forward and loss under bf16 autocast
(weights and optimizer in fp32, as the recipe trains on GPUs).

With ``--out``, ``results.json`` and ``results.md`` are rewritten after each timed round (marked
partial until the last), so a run cut off keeps the rounds it timed.

Memory, per implementation: the activations autograd saves for the backward in one forward (the
distinct non-parameter storages, counted with ``saved_tensors_hooks``; any device), and on a GPU the
peak allocated memory of one step.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import recvit
from recvit.bench import SCALES, DeiTDense, device_info, device_slug, percentile, profile_depths, time_interleaved
from recvit.bench.timer import peak_memory, saved_activation_bytes


def _step_fn(model, optimizer, loss_fn, autocast):
    def step(images, targets, depths):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model, images, targets, depths)
        loss.backward()
        optimizer.step()
    return step


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--profile", default="paper", choices=("paper", "ranker"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: forward and loss under bf16 autocast")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="Edge-RecViT backends (default: packed eager, and triton on a GPU)")
    parser.add_argument("--out", default=None, help="write results.json and results.md under OUT/<device>/")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dim, heads = SCALES[args.scale]
    base = recvit.create_model(f"edge_recvit_{args.scale}", img_size=args.img_size).to(device).train()
    deit = DeiTDense(args.img_size, embed_dim=dim, num_heads=heads).to(device).train()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    targets = torch.randint(0, 1000, (args.batch,), device=device)
    generator = torch.Generator().manual_seed(0)
    depths = profile_depths(args.profile, args.batch, base.num_tokens, base.num_steps, generator)
    depths = None if depths is None else depths.to(device)
    criterion = recvit.EdgeRecViTLoss(label_smoothing=0.1)
    if args.backends is None:
        args.backends = ["packed", "triton", "eager"] if device.type == "cuda" else ["packed", "eager"]

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16")

    fns, saved_mib, peak_mib = {}, {}, {}
    losses = {f"edge-recvit-{backend}": lambda m, x, y, d, b=backend: criterion(
        m(x, depths=d, return_aux=True, backend=b), y).total for backend in args.backends}
    losses["deit-dense"] = lambda m, x, y, d: F.cross_entropy(m(x), y, label_smoothing=0.1)
    for name, loss_fn in losses.items():
        model = deit if name == "deit-dense" else copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        fns[name] = _step_fn(model, optimizer, loss_fn, autocast)
        try:  # an implementation that cannot run is reported with the others, by time_interleaved
            with autocast():
                saved = saved_activation_bytes(model, lambda: loss_fn(model, images, targets, depths))
            saved_mib[name] = saved / 2 ** 20
            if device.type == "cuda":
                peak_mib[name] = peak_memory(fns[name], (images, targets, depths), device) / 2 ** 20
        except Exception as error:  # noqa: BLE001  (the timing run records it as failed)
            print(f"{name}: memory not measured: {error!r}")
    flops = recvit.count_flops(base, depths if depths is not None else base(images, return_aux=True).depths)

    def report(times: dict, complete: bool) -> None:
        failed = {name: repr(value) for name, value in times.items() if isinstance(value, Exception)}
        times = {name: value for name, value in times.items() if name not in failed}
        rounds = min((len(values) for values in times.values()), default=0)
        ratios = {}
        for name in times:
            for other in times:
                if name != other:
                    ratios[f"{other} / {name}"] = summary([b / a for a, b in zip(times[name], times[other])])
        result = {"device": info, "settings": vars(args), "complete": complete, "failed": failed,
                  "forward_gflops_per_image": {"edge-recvit": flops.total / 1e9},
                  "seconds_per_step": {name: summary(values) for name, values in times.items()},
                  "saved_activations_mib": saved_mib, "peak_memory_mib": peak_mib,
                  "raw_seconds": times, "speedup": ratios}
        lines = [] if complete else [f"**Partial**: {rounds} of {args.rounds} rounds timed when this was written.", ""]
        lines += [f"Training step (forward + backward + AdamW), {args.scale}, batch {args.batch}, {args.img_size} px, "
                  f"{args.dtype}, depth profile {args.profile!r}, {rounds} interleaved rounds on "
                  f"{info['name']} ({info['torch_threads']} threads), commit {info['git_commit'][:10]}.", "",
                  "| implementation | s/step median | p25 | p75 | saved activations MiB | peak MiB |",
                  "|---|---|---|---|---|---|"]

        def memory(name):
            return (f"{saved_mib[name]:.1f}" if name in saved_mib else "-") + " | " + \
                (f"{peak_mib[name]:.0f}" if name in peak_mib else "-")

        lines += [f"| {name} | {s['median']:.3f} | {s['p25']:.3f} | {s['p75']:.3f} | {memory(name)} |"
                  for name, s in result["seconds_per_step"].items()]
        lines += ["", "| speed-up (time of the second / time of the first, per round) | median | p25 | p75 |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {s['median']:.2f}x | {s['p25']:.2f}x | {s['p75']:.2f}x |" for name, s in ratios.items()
                  if name.endswith("edge-recvit-packed")]
        if not complete:
            print(f"timed round {rounds} of {args.rounds}", flush=True)
        publish("\n".join(lines), result, args.out, quiet=not complete)

    info = device_info(device)
    times = time_interleaved(fns, [(images, targets, depths)], device, warmup=2, min_repeats=args.rounds,
                             max_repeats=args.rounds, target_s=0.0,
                             on_round=lambda so_far: report(so_far, complete=False))
    report(times, complete=True)
    return 0


def summary(values: Sequence[float]) -> dict:
    """The median and the 25th / 75th percentiles of per-round values."""
    return {"median": percentile(values, 50), "p25": percentile(values, 25), "p75": percentile(values, 75)}


def publish(text: str, result: dict, out: Optional[str], quiet: bool = False) -> None:
    """Print ``text`` (and ``result["failed"]``) unless ``quiet``; with ``out``, write ``result`` as
    results.json and ``text`` as results.md under ``out/<device>/``, each whole under a temporary
    name, then renamed: a run killed while writing leaves the previous version, never half a file."""
    if not quiet:
        print(text)
        if result["failed"]:
            print("failed:", result["failed"])
    if out:
        folder = os.path.join(out, device_slug(result["device"]))
        os.makedirs(folder, exist_ok=True)
        for name, content in (("results.json", json.dumps(result, indent=1)), ("results.md", text + "\n")):
            partial = os.path.join(folder, f".{name}.partial")
            with open(partial, "w") as handle:
                handle.write(content)
            os.replace(partial, os.path.join(folder, name))


if __name__ == "__main__":
    raise SystemExit(main())
