"""Inference of the early-exit DeiT (:func:`recvit.from_vit`: the DeiT's own 12 blocks, each token
stopping after its depth) against the dense DeiT and ToMe at the same FLOPs, timed interleaved on
the present device.

    python -m benchmarks.early_exit [--scale small] [--batch 8] [--img-size 224] [--dtype fp32]
                                    [--rounds 15] [--threads 1] [--out benchmarks/results/early-exit]

The implementations are the harness's (``recvit.bench.implementations``): ``deit-dense``, ``tome``
(r chosen for the FLOPs of the paper profile), ``early-exit-reference`` (the masked loop: every
token through every block, updates gated; what a user writes today) and ``early-exit-packed``
(ours), all on the same DeiT weights and, for the early exit, the paper's depth profile (sum alpha
= 8.21, sum alpha^2 = 6.64). One call of each per round, in turn; ratios are taken within a round
and reported as the median with the 25th-75th percentiles.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

import recvit
from recvit.bench import (DTYPES, SCALES, DeiTDense, dense_flops, device_info, implementations, profile_depths,
                          time_interleaved, tome_flops)
from recvit.bench.implementations import tome_r

from .train_step import publish, summary

NAMES = ("deit-dense", "tome", "early-exit-reference", "early-exit-packed")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.early_exit", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write results.json and results.md under OUT/<device>/")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device("cuda" if torch.cuda.is_available() else "cpu"), DTYPES[args.dtype]
    torch.manual_seed(0)
    dim, heads = SCALES[args.scale]
    model = recvit.create_model(f"edge_recvit_{args.scale}", img_size=args.img_size).eval().to(device, dtype)
    deit = DeiTDense(args.img_size, embed_dim=dim, num_heads=heads).eval().to(device, dtype)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    depths = profile_depths("paper", args.batch, model.num_tokens, model.num_steps,
                            torch.Generator().manual_seed(0)).to(device)
    registry = {impl.name: impl for impl in implementations()}
    with torch.inference_mode():
        fns = {name: registry[name].build(model, deit, images, depths) for name in NAMES}
        times = time_interleaved(fns, [(images, depths)], device, warmup=2, min_repeats=args.rounds,
                                 max_repeats=args.rounds, target_s=0.0)
    failed = {name: repr(value) for name, value in times.items() if isinstance(value, Exception)}
    times = {name: value for name, value in times.items() if name not in failed}

    ratios = {f"{base} / {name}": summary([b / a for a, b in zip(times[name], times[base])])
              for name in times if name.startswith("early-exit") for base in times if base != name}
    early_exit = recvit.from_vit(deit)
    gflops = {"deit-dense": dense_flops(deit) / 1e9, "tome": tome_flops(deit, tome_r(model, deit)) / 1e9,
              "early-exit": recvit.count_flops(early_exit, depths).total / 1e9,
              "early-exit (blocks only, no ranker)": (recvit.count_flops(early_exit, depths).total
                                                      - recvit.count_flops(early_exit, depths).ranker) / 1e9}
    info = device_info(device)
    result = {"device": info, "settings": vars(args), "failed": failed, "gflops_per_image": gflops,
              "seconds_per_call": {name: summary(values) for name, values in times.items()},
              "raw_seconds": times, "speedup": ratios}
    lines = [f"Inference, DeiT-{args.scale.capitalize()} weights, batch {args.batch}, {args.img_size} px, "
             f"{args.dtype}, the paper's depth profile for the early exit, {args.rounds} interleaved rounds on "
             f"{info['name']} ({info['torch_threads']} thread{'s' if info['torch_threads'] > 1 else ''}, "
             f"load average {info['load_average']}), commit {info['git_commit'][:10]}.", "",
             "GFLOPs per image: " + ", ".join(f"{name} {value:.2f}" for name, value in gflops.items()) + ".", "",
             "| implementation | s/call median | p25 | p75 |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['median']:.3f} | {s['p25']:.3f} | {s['p75']:.3f} |"
              for name, s in result["seconds_per_call"].items()]
    lines += ["", "| speed-up (time of the first / time of the second, per round) | median | p25 | p75 |",
              "|---|---|---|---|"]
    lines += [f"| {name} | {s['median']:.2f}x | {s['p25']:.2f}x | {s['p75']:.2f}x |" for name, s in ratios.items()]
    publish("\n".join(lines), result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
