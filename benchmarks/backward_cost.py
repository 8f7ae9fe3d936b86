"""What one training step's backward writes and computes, per recursion step, on the sync-free
static path: the triton backward against the eager one, and against the triton backward before the
token-wise layers had Triton backward kernels (it reran the eager ops over every row).

    python -m benchmarks.backward_cost [--scale small] [--batch 1] [--img-size 224] [--dtype fp16]
                                       [--before COMMIT] [--out benchmarks/results/backward-cost]

Edge-RecViT at the paper's depth profile (``recvit.bench.profile_depths("paper")``). For each
recursion step l, ``tests/launches.py``'s ``step_backward`` runs the step as training runs it
(``Block.forward_static``, merged with ``torch.where(position < M_l, ...)``) and traces its backward
on the CPU, Triton kernels in the interpreter: bytes written (aten outputs, Triton's masked
``tl.store``s), token-wise GEMM FLOPs (aten ``mm``/``addmm`` from their shapes; the Triton prefix
linear kernels' ``tl.dot`` tiles as issued, 32-row tiles in the interpreter, masked rows included;
attention is left out on both sides: eager's fused SDPA cannot be counted) and launches. These
counts depend on shapes and live counts only, not on the device. Steps with the same M_l have the
same shapes, so each distinct M_l is traced once. ``--before COMMIT`` traces the triton backward
of that commit's ``recvit``/``recvit_kernels`` (exported with ``git archive``) in a subprocess.
Writes ``results.json`` and ``results.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _is_tokenwise_gemm(launch) -> bool:
    return launch.name in ("mm", "addmm") or launch.name.startswith("_prefix_linear")


def measure(scale: str, batch: int, img_size: int, dtype: str, backends: Sequence[str]) -> dict:
    """{"step_rows": [M_1..M_L], "rows": B*N, backend: [{bytes, gemm_flops, launches} per step]}."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT / "tests"))
    import recvit
    import recvit_kernels as rk
    from launches import step_backward
    from recvit.bench import profile_depths

    rk.unavailable_reason("triton")  # load the backends before tracing
    torch.manual_seed(0)
    model = recvit.create_model(f"edge_recvit_{scale}", img_size=img_size).to(DTYPES[dtype])
    depths = profile_depths("paper", batch, model.num_tokens, model.num_steps, torch.Generator().manual_seed(0))
    layout = rk.depth_sort(depths, model.num_steps)
    rows = torch.randn(batch * model.num_tokens, model.embed_dim, dtype=DTYPES[dtype])
    step_rows = [int(m) for m in layout.step_rows]
    result = {"step_rows": step_rows, "rows": rows.shape[0]}
    for backend in backends:
        by_rows = {}
        for step, live in enumerate(step_rows, start=1):
            if live not in by_rows:
                trace = step_backward(model.recursion.layer_for_step(step), rows, layout, step, "active", backend)
                by_rows[live] = dict(bytes=trace.bytes_written(), launches=trace.count(),
                                     gemm_flops=sum(l.gemm_flops for l in trace.launches if _is_tokenwise_gemm(l)))
                print(f"{backend} step {step} M={live}: {by_rows[live]}", file=sys.stderr)
        result[backend] = [by_rows[live] for live in step_rows]
    return result


def measure_before(commit: str, args) -> list:
    """The triton backward's per-step counts at ``commit`` (its packages, this module and launches.py)."""
    archive = subprocess.run(["git", "archive", commit, "recvit", "recvit_kernels"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tree:
        tarfile.open(fileobj=BytesIO(archive)).extractall(tree)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, str(ROOT)]), "TRITON_INTERPRET": "1"}
        output = subprocess.run(
            [sys.executable, "-m", "benchmarks.backward_cost", "--scale", args.scale, "--batch", str(args.batch),
             "--img-size", str(args.img_size), "--dtype", args.dtype, "--backends", "triton", "--print"],
            cwd=tree, env=env, capture_output=True, text=True, check=True).stdout  # cwd first on sys.path
    return json.loads(output.splitlines()[-1])["triton"]


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def markdown(results: dict) -> str:
    setting = results["setting"]
    steps, rows = results["step_rows"], results["rows"]
    runs = {"eager": results["eager"], "triton": results["triton"]}
    if "triton_before" in results:
        runs["triton before"] = results["triton_before"]
    total = lambda name, key: sum(step[key] for step in runs[name])
    before = f", before: the triton backward at {setting['before']}" if setting.get("before") else ""
    lines = ["# Backward of one static-path step: bytes written and token-wise GEMM FLOPs", "",
             f"Edge-RecViT-{setting['scale'].capitalize()}, batch {setting['batch']}, {setting['img_size']} px "
             f"({rows} rows), {setting['dtype']}, the paper's depth profile, kv active; counted on the CPU "
             f"(Triton interpreter) by `python -m benchmarks.backward_cost` at commit {results['commit']}{before}. "
             "Bytes: every aten output and Triton store of the step's backward. GEMM FLOPs: the QKV, proj, "
             "fc1 and fc2 products, aten `mm`/`addmm` from their shapes, Triton's `tl.dot` tiles as issued "
             "(32-row tiles in the interpreter, so the live rows rounded up to 32); attention's are left out "
             "on both sides. Exactly counted, the live rows' GEMM FLOPs are M_l / R of eager's.", ""]
    head = ["step", "M_l"] + [f"{name} MB" for name in runs] + ["triton / eager bytes"] + \
        [f"{name} GFLOP" for name in runs] + ["triton / eager FLOPs"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows_of = [(str(index + 1), str(live), {name: run[index] for name, run in runs.items()})
               for index, live in enumerate(steps)]
    rows_of.append(("all", str(sum(steps)), {name: {key: total(name, key) for key in ("bytes", "gemm_flops")}
                                             for name in runs}))
    for step, live, counts in rows_of:
        cells = [step, live] + [f"{counts[name]['bytes'] / 1e6:.2f}" for name in runs]
        cells += [f"{counts['triton']['bytes'] / counts['eager']['bytes']:.2f}"]
        cells += [f"{counts[name]['gemm_flops'] / 1e9:.3f}" for name in runs]
        cells += [f"{counts['triton']['gemm_flops'] / counts['eager']['gemm_flops']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    percent = lambda name, key: f"{100 * total('triton', key) / total(name, key):.0f}%"
    summary = (f"Over the {len(steps)} steps the triton backward writes {percent('eager', 'bytes')} of the "
               "eager backward's bytes")
    if "triton before" in runs:
        summary += f" and {percent('triton before', 'bytes')} of what it wrote before"
    summary += f"; its token-wise GEMMs issue {percent('eager', 'gemm_flops')} of eager's FLOPs"
    if "triton before" in runs:
        summary += f" and {percent('triton before', 'gemm_flops')} of what they issued before"
    summary += (f" (the live rows are {100 * sum(steps) / (len(steps) * rows):.0f}% of the static rows). "
                "Launches per step: " + ", ".join(f"{name} {run[0]['launches']}" for name, run in runs.items())
                + ".")
    return "\n".join(lines + ["", summary, ""])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backward_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--backends", nargs="+", default=["eager", "triton"])
    parser.add_argument("--before", default=None, metavar="COMMIT",
                        help="also trace the triton backward of this commit")
    parser.add_argument("--print", action="store_true", help="print the JSON, write nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "backward-cost")
    args = parser.parse_args(argv)
    results = measure(args.scale, args.batch, args.img_size, args.dtype, args.backends)
    if args.print:
        print(json.dumps(results))
        return 0
    results["setting"] = dict(scale=args.scale, batch=args.batch, img_size=args.img_size, dtype=args.dtype,
                              before=args.before)
    results["commit"] = _commit()
    results["torch"] = torch.__version__
    if args.before:
        results["triton_before"] = measure_before(args.before, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
