"""``recvit bench`` / ``python -m benchmarks.run``: arguments, checked before any work starts, the
run, and what it prints and writes."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from .implementations import IMPLEMENTATION_NAMES
from .profiles import PROFILES
from .report import fastest_line, headline_table, noise_summary, verdict, write_results
from .runner import run
from .settings import DTYPES, SCALES, Settings, busy_warning, cpu_name, default_settings


def default_results_root() -> Path:
    """Where ``--full`` writes without ``--out``: ``$XDG_CACHE_HOME/recvit/bench`` (by default
    ``~/.cache/recvit/bench``), outside any source tree so results are not committed by mistake."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "recvit" / "bench"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recvit bench",
        description="Time Edge-RecViT implementations against what a user would run instead (a dense "
                    "DeiT, eager and in a CUDA graph; ToMe token merging at the same FLOPs) on the "
                    "present device. Default: a quick run that shows the point here (CPU: Small, 224 px, "
                    "batch 1 and 16, about 30 s; GPU: Base, bf16, batch 1 to 256). --full: the whole "
                    "harness (all implementations, depth profiles, batch sizes), written to --out.")
    parser.add_argument("--full", action="store_true", help="run the whole harness and write results")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even where a GPU is present")
    parser.add_argument("--out", type=Path, default=None,
                        help="results root: files go to OUT/<device>/ (default with --full: "
                             f"{default_results_root()}; the quick run writes nothing unless given); rewritten "
                             "after each batch, so a run cut off keeps what it measured")
    parser.add_argument("--scales", nargs="+", choices=sorted(SCALES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--img-sizes", nargs="+", type=int)
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--profiles", nargs="+", choices=PROFILES)
    parser.add_argument("--implementations", nargs="+", metavar="NAME",
                        help=f"subset of: {', '.join(IMPLEMENTATION_NAMES)}")
    parser.add_argument("--compile", action="store_true", help="time torch.compile on the CPU too")
    parser.add_argument("--target-s", type=float,
                        help="seconds of timed calls per implementation and measurement")
    parser.add_argument("--min-rounds", type=int,
                        help="at least this many interleaved rounds per measurement (more rounds: a "
                             "tighter spread on a noisy machine)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (tqdm is not imported)")
    return parser


def settings_from_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> Settings:
    """The settings the arguments ask for; a user error ends in ``parser.error`` (exit 2, no traceback)."""
    parser = parser or _parser()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    settings = default_settings(device, full=args.full)
    for name in ("scales", "dtypes", "img_sizes", "batch_sizes", "profiles", "implementations"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, list(value))
    if args.implementations is not None:
        unknown = [name for name in args.implementations if name not in IMPLEMENTATION_NAMES]
        if unknown:
            parser.error(f"argument --implementations: unknown {', '.join(unknown)}; expected names from "
                         f"{', '.join(IMPLEMENTATION_NAMES)}")
    if args.batch_sizes is not None:
        if any(b < 1 for b in args.batch_sizes):
            parser.error(f"argument --batch-sizes: expected positive integers, got {args.batch_sizes}")
        settings.profile_batch_sizes = [b for b in settings.profile_batch_sizes if b in args.batch_sizes] \
            or list(args.batch_sizes)
        settings.latency_batches = [b for b in settings.latency_batches if b in args.batch_sizes]
    if args.profiles is not None:
        settings.headline_profile = args.profiles[0]
    if args.target_s is not None:
        if args.target_s < 0:
            parser.error(f"argument --target-s: expected seconds >= 0, got {args.target_s}")
        settings.target_s = args.target_s
    if args.min_rounds is not None:
        if args.min_rounds < 1:
            parser.error(f"argument --min-rounds: expected a positive integer, got {args.min_rounds}")
        settings.min_repeats = args.min_rounds
        settings.latency_repeats = max(settings.latency_repeats, args.min_rounds)
    settings.force_compile = args.compile
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"argument --threads: expected a positive integer, got {args.threads}")
        settings.threads = args.threads
    if device == "cpu" and any(d != "fp32" for d in settings.dtypes):
        parser.error(f"argument --dtypes: the CPU mode times fp32 only, got {' '.join(settings.dtypes)}")
    for size in settings.img_sizes:
        if size < 16 or size % 16:
            parser.error(f"argument --img-sizes: {size} is not a positive multiple of the patch size 16")
    return settings


def _check_output(args, parser) -> Optional[Path]:
    """The results root to write to (None: nothing written), checked writable, and matplotlib present
    when plots are asked for: before minutes of work, not after."""
    out = args.out if args.out is not None else (default_results_root() if args.full else None)
    if out is None:
        return None
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("writing results draws PNG plots, which need matplotlib: pip install "
                         "'recvit[viz]' (or pass --no-plots)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --out: cannot create {out}: {error.strerror or error}")
    if not os.access(out, os.W_OK):
        parser.error(f"argument --out: {out} is not writable")
    return out


def _write_partial(results: dict, out: Path) -> None:
    """The results so far, written after each batch: a run cut off keeps what it measured."""
    folder = write_results(results, out, plots=False)
    last = results["records"][-1]
    print(f"measured {last['scale']} {last['dtype']} {last['img_size']} px, profile {last['profile']}, "
          f"batch {last['batch']}: {len(results['records'])} records in {folder}/results.json", flush=True)


def describe(settings: Settings) -> str:
    """What the run compares, in words (printed before it starts)."""
    device = cpu_name() if settings.device == "cpu" else torch.cuda.get_device_name(0)
    threads = settings.threads or torch.get_num_threads()
    scales = ", ".join(s.capitalize() for s in settings.scales)
    batches = sorted(set(settings.batch_sizes) | set(settings.latency_batches))
    names = ", ".join(settings.implementations or IMPLEMENTATION_NAMES)
    return (f"Timing on {settings.device} ({device}, {threads} torch thread{'s' if threads > 1 else ''}): Edge-RecViT-{scales} against "
            f"DeiT-{scales} of the same width and what else a user would run, {'/'.join(settings.dtypes)}, "
            f"{'/'.join(map(str, settings.img_sizes))} px, batch {', '.join(map(str, batches))}, depth "
            f"profile{'s' if len(settings.profiles) > 1 else ''} {', '.join(settings.profiles)}.\n"
            f"Implementations: {names} (the ones that cannot run here are listed with why).")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args, parser)
    out = _check_output(args, parser)
    print(describe(settings), flush=True)
    busy = busy_warning(settings.threads or torch.get_num_threads()) if settings.device == "cpu" else None
    if busy:
        print(busy, flush=True)
    results = run(settings, progress=not args.no_progress,
                  on_batch=None if out is None else lambda partial: _write_partial(partial, out))
    print()
    print(headline_table(results))
    print()
    line = verdict(results)
    if line:
        print(line)
    print(noise_summary(results))
    if out is not None:
        folder = write_results(results, out, plots=not args.no_plots)
        print(f"wrote {folder}/results.json, results.md" + ("" if args.no_plots else " and PNG plots"))
    fastest = fastest_line(results)
    if fastest:
        print(fastest)
    return 0
