"""One Edge-RecViT forward per implementation under the torch profiler, summarised per kernel.

``python -m benchmarks.profile_forward [--device cuda] [--scale base] [--dtype bf16] [--batch 8]
[--implementations ...] --out DIR`` writes ``DIR/profile.md`` (per implementation: the forward's
median time and achieved TFLOP/s against its active FLOPs, then every kernel: calls, total and
mean time, share, and achieved TFLOP/s where the profiler counts the FLOPs of the op that launched
it, i.e. the cuBLAS GEMMs) and ``DIR/trace-<implementation>.json`` (chrome://tracing). On a CPU the
rows are the aten ops' self times instead of kernels.

Implementations: ``reference`` (the eager masked forward: every token through every step, updates
gated, as the public code runs it; the cost of a dense DeiT), ``packed``, ``triton``, ``cuda`` (the
depth-sorted prefix path on each backend) and ``triton+graph``, ``cuda+graph`` (the sync-free
forward captured in one CUDA graph). The depths are uniform in 1..12 ([CLS] at 12), the same for
every implementation.

``--ncu``: one implementation, warmed up, then one forward between ``cudaProfilerStart`` and
``cudaProfilerStop`` for ``ncu --profile-from-start off``; ``--ncu-summary CSV... --out FILE``
turns ncu's ``--csv`` output (``gpu__time_duration.sum``, ``dram__bytes_read.sum``,
``dram__bytes_write.sum``, ``sm__throughput.avg.pct_of_peak_sustained_elapsed``) into a Markdown
table with the achieved DRAM GB/s per kernel. ``benchmarks/gpu_run.sh profile`` runs all three.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

SCALES = {"tiny": "edge_recvit_tiny", "small": "edge_recvit_small", "base": "edge_recvit_base"}
IMPLEMENTATIONS = ("reference", "packed", "triton", "cuda", "triton+graph", "cuda+graph")
NCU_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
               "sm__throughput.avg.pct_of_peak_sustained_elapsed")


def build(name: str, model, images, depths):
    """``fn() -> logits`` running implementation ``name``, or raise with the reason it cannot."""
    import recvit_kernels as rk
    from recvit import compile_graph

    backend = name.removesuffix("+graph")
    if backend != "reference":
        reason = rk.unavailable_reason(backend)
        if reason is not None:
            raise RuntimeError(f"backend {backend} unavailable: {reason}")
    if name.endswith("+graph"):
        graphed = compile_graph(model, images, depths, backend=backend)
        return lambda: graphed(images, depths)
    backend = "eager" if name == "reference" else name
    return lambda: model(images, depths=depths, backend=backend)


def median_ms(fn, device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones (CUDA events on a
    GPU, wall clock on the CPU; :func:`recvit.bench.time_interleaved` with one implementation)."""
    from recvit.bench import percentile, time_interleaved

    seconds = time_interleaved({"fn": fn}, [()], device, warmup, min_repeats=repeats, max_repeats=repeats,
                               target_s=0.0)["fn"]
    if isinstance(seconds, Exception):
        raise seconds
    return percentile(seconds, 50) * 1e3


def kernel_table(prof, device_type: str) -> list[dict]:
    """Per kernel name (CPU: per aten op, self time): calls, total us, FLOPs where all are counted."""
    from torch.autograd import DeviceType

    rows: dict = defaultdict(lambda: {"calls": 0, "us": 0.0, "flops": 0.0, "counted": 0})
    events = prof.events()
    if device_type == "cuda":
        for event in events:
            if event.device_type == DeviceType.CUDA:
                row = rows[event.name]
                row["calls"] += 1
                row["us"] += event.time_range.elapsed_us()
        for event in events:  # an op's FLOPs go to the kernels it launched
            if event.device_type == DeviceType.CPU and event.flops and event.kernels:
                for kernel in event.kernels:
                    if kernel.name in rows:
                        rows[kernel.name]["flops"] += event.flops / len(event.kernels)
                        rows[kernel.name]["counted"] += 1
    else:
        for event in events:
            if event.device_type == DeviceType.CPU and event.name.startswith("aten::"):
                row = rows[event.name]
                row["calls"] += 1
                row["us"] += event.self_cpu_time_total
                if event.flops:
                    row["flops"] += event.flops
                    row["counted"] += 1
    table = [{"name": name, **row} for name, row in rows.items() if row["us"] > 0]
    return sorted(table, key=lambda row: -row["us"])


def profile_one(name, model, images, depths, device, out_dir: Path, top: int, repeats: int) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from recvit import count_flops

    fn = build(name, model, images, depths)
    with torch.no_grad():
        ms = median_ms(fn, device, repeats, warmup=3)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, with_flops=True) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
    prof.export_chrome_trace(str(out_dir / f"trace-{name}.json"))
    flops = count_flops(model, depths).total * images.shape[0]
    table = kernel_table(prof, device.type)
    total_us = sum(row["us"] for row in table)
    unit = "kernel" if device.type == "cuda" else "aten op (self time)"
    lines = [f"### {name}", "",
             f"Forward: {ms:.3f} ms, median of {repeats} ({'CUDA events' if device.type == 'cuda' else 'wall clock'}); "
             f"{flops / 1e9:.4g} GFLOPs active (recvit.count_flops) -> {flops / ms / 1e9:.3g} TFLOP/s. "
             f"Profiled forward: {len(table)} {unit} names, {sum(r['calls'] for r in table)} calls, "
             f"{total_us / 1e3:.3f} ms summed.", "",
             f"| {unit} | calls | total us | mean us | share | TFLOP/s |", "|---|---|---|---|---|---|"]
    for row in table[:top]:
        tflops = (f"{row['flops'] / row['us'] / 1e6:.3g}" if row["flops"] and row["counted"] == row["calls"]
                  else "-")
        label = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
        lines.append(f"| `{label}` | {row['calls']} | {row['us']:.1f} | {row['us'] / row['calls']:.1f} | "
                     f"{100 * row['us'] / total_us:.1f}% | {tflops} |")
    if len(table) > top:
        rest = sum(row["us"] for row in table[top:])
        lines.append(f"| ({len(table) - top} more) | | {rest:.1f} | | {100 * rest / total_us:.1f}% | |")
    return lines + [""]


def ncu_summary(paths: Sequence[Path]) -> list[str]:
    """Markdown from ncu ``--csv`` files: one row per kernel name (summed over launches)."""
    lines = ["## ncu (per kernel, summed over its launches)", "",
             "DRAM GB/s = (dram__bytes_read + dram__bytes_write) / gpu__time_duration; SM % = "
             "sm__throughput.avg.pct_of_peak_sustained_elapsed (mean over launches).", ""]
    for path in paths:
        kernels: dict = defaultdict(lambda: defaultdict(list))
        text = Path(path).read_text(errors="replace").splitlines()
        header = next((i for i, line in enumerate(text) if line.startswith('"ID"')), None)
        if header is None:
            lines += [f"{Path(path).name}: no ncu CSV rows (see its log)", ""]
            continue
        for record in csv.DictReader(text[header:]):
            name, metric = record.get("Kernel Name"), record.get("Metric Name")
            if name and metric in NCU_METRICS:
                kernels[name][metric].append(_number(record.get("Metric Value", "")))
        lines += [f"### {Path(path).stem}", "",
                  "| kernel | launches | total us | DRAM GB/s | SM % |", "|---|---|---|---|---|"]
        for name, metrics in sorted(kernels.items(), key=lambda kv: -sum(kv[1]["gpu__time_duration.sum"])):
            ns = sum(metrics["gpu__time_duration.sum"])
            moved = sum(metrics["dram__bytes_read.sum"]) + sum(metrics["dram__bytes_write.sum"])
            sm = metrics["sm__throughput.avg.pct_of_peak_sustained_elapsed"]
            label = name if len(name) <= 90 else name[:87] + "..."
            lines.append(f"| `{label}` | {len(metrics['gpu__time_duration.sum'])} | {ns / 1e3:.1f} | "
                         f"{moved / ns if ns else 0:.0f} | {statistics.mean(sm) if sm else 0:.1f} |")
        lines.append("")
    return lines


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_forward",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--scale", choices=sorted(SCALES), default="base")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=None)
    parser.add_argument("--top", type=int, default=25, help="kernels listed per implementation")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards for the median")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True, help="folder (profile.md, traces) or, with "
                        "--ncu-summary, the Markdown file")
    parser.add_argument("--ncu", action="store_true", help="one forward between cudaProfilerStart/Stop")
    parser.add_argument("--ncu-summary", nargs="+", type=Path, default=None, metavar="CSV")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.ncu_summary is not None:
        args.out.write_text("\n".join(ncu_summary(args.ncu_summary)) + "\n")
        print(f"wrote {args.out}")
        return 0
    import torch

    from recvit import create_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: no CUDA device visible")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    names = args.implementations or [n for n in IMPLEMENTATIONS if device.type == "cuda" or "graph" not in n]
    torch.manual_seed(0)
    model = create_model(SCALES[args.scale], img_size=args.img_size).eval().to(device, dtype)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    depths = torch.randint(1, model.num_steps + 1, (args.batch, model.num_tokens), device=device)
    depths[:, 0] = model.num_steps
    if args.ncu:
        if len(names) != 1 or device.type != "cuda":
            parser.error("argument --ncu: name one implementation, on cuda")
        fn = build(names[0], model, images, depths)
        with torch.no_grad():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        print(f"ncu: profiled one {names[0]} forward")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# One forward per implementation: edge_recvit_{args.scale}, {args.dtype}, batch {args.batch}, "
             f"{args.img_size} px, {device.type}"
             + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), "",
             f"torch {torch.__version__}; depths uniform in 1..{model.num_steps} ([CLS] at "
             f"{model.num_steps}). TFLOP/s per kernel: the profiler's FLOP count of the aten op that "
             "launched it (GEMMs, convolutions); '-' where it has none (Triton and extension kernels).", ""]
    for name in names:
        try:
            lines += profile_one(name, model, images, depths, device, args.out, args.top, args.repeats)
            print(f"profiled {name}", flush=True)
        except Exception as error:  # recorded, the other implementations go on
            lines += [f"### {name}", "", f"not profiled: {type(error).__name__}: {error}", ""]
            print(f"{name}: {type(error).__name__}: {error}", flush=True)
        (args.out / "profile.md").write_text("\n".join(lines) + "\n")  # after each: a cut-off run keeps it
    print(f"wrote {args.out / 'profile.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
