"""Reports of a results dictionary: the headline table (also the README's), the table of the targets
the GPU numbers are held against (:data:`TARGETS`), the full Markdown report, the files written,
and the plain-language lines the quick run prints.

Every figure is shown with its spread over the interleaved rounds, ``median (p10-p90)``. A
speed-up is the median of the per-round ratios; ``~`` marks one whose p10-p90 range contains 1 (the
noise is too wide to rank the two implementations), ``*`` a time whose p90 is more than
``NOISY_SPREAD`` times its p10 (the machine changed speed under it). Results written before the
spread was recorded show the median alone.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .settings import device_slug
from .timer import NOISY_SPREAD

LEGEND = (f"Figures: median of the interleaved rounds, (p10-p90) beside it. Speed-ups are per-round "
          f"ratios against the baseline timed in the same rounds. `~`: the ratio's p10-p90 range "
          f"contains 1, so noise cannot rank the two; `*`: a time whose p90 exceeds {NOISY_SPREAD:g}x "
          f"its p10 (the machine changed speed during it).")


def _fmt(value, digits=2):
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def _records(results: dict, config: dict, profile: str) -> list[dict]:
    return [r for r in results["records"] if r["profile"] == profile
            and all(r[k] == config[k] for k in ("scale", "dtype", "img_size"))]


def time_cell(record: Optional[dict], digits: int = 2) -> str:
    """``p50 (p10-p90)`` in ms, ``*`` when noisy; the status when not measured."""
    if not record or record["status"] != "ok":
        return record["status"] if record else "n/a"
    if "p10_ms" not in record:
        return _fmt(record["p50_ms"], digits)
    return (f"{_fmt(record['p50_ms'], digits)} ({_fmt(record['p10_ms'], digits)}-"
            f"{_fmt(record['p90_ms'], digits)})" + ("*" if record.get("noisy") else ""))


def rate_cell(record: Optional[dict]) -> str:
    """Images/s at the median time, (the p90 time's rate - the p10 time's rate)."""
    if not record or record["status"] != "ok":
        return record["status"] if record else "n/a"
    if "p10_ms" not in record:
        return _fmt(record["images_per_s"], 1)
    batch = record["batch"] * 1e3
    return (f"{_fmt(record['images_per_s'], 1)} ({_fmt(batch / record['p90_ms'], 1)}-"
            f"{_fmt(batch / record['p10_ms'], 1)})" + ("*" if record.get("noisy") else ""))


def ratio_cell(record: Optional[dict], label: str) -> str:
    """``1.46x (1.32-1.58)``; ``~`` when the range contains 1; just ``1.00x`` for the baseline itself."""
    if not record or record["status"] != "ok":
        return record["status"] if record else "n/a"
    value = record.get(f"speedup_{label}")
    if value is None:
        return "n/a"
    ranked = record.get(f"speedup_{label}_ranked")
    if f"speedup_{label}_p10" not in record or ranked is None:
        return f"{value:.2f}x"
    return (f"{value:.2f}x ({record[f'speedup_{label}_p10']:.2f}-{record[f'speedup_{label}_p90']:.2f})"
            + ("" if ranked else " ~"))


def caption(results: dict, config: dict, profile: str) -> str:
    """Which models, device, precision, resolution, profile, FLOPs and versions a table compares."""
    dev, scale = results["device"], config["scale"].capitalize()
    records = _records(results, config, profile)
    sums = next((r for r in records if r["implementation"] == "reference"), records[0] if records else {})
    ours = next((r["flops_per_image"] for r in records if r["implementation"] in ("reference", "packed")), None)
    text = (f"{dev['name']}, Edge-RecViT-{scale} vs DeiT-{scale}, {config['dtype']}, {config['img_size']}px "
            f"({config['tokens']} tokens), depth profile '{profile}' (realised sum alpha = "
            f"{sums.get('sum_alpha', 'n/a')}, sum alpha^2 = {sums.get('sum_alpha_sq', 'n/a')}")
    if ours is not None:
        text += f"; Edge-RecViT {ours / 1e9:.2f} GFLOPs/image, DeiT {config['dense_flops'] / 1e9:.2f}"
    text += ")"
    if "tome_r" in config:
        text += (f"; ToMe merges r = {config['tome_r']} tokens per layer: {config['tome_flops'] / 1e9:.2f} "
                 f"GFLOPs/image against Edge-RecViT's {config['recvit_paper_flops'] / 1e9:.2f} with the "
                 f"paper profile")
    return text + f"; torch {dev['torch']}, {dev.get('torch_threads', '?')} torch thread(s), commit {dev['git_commit'][:10]}."


def headline_table(results: dict, config: Optional[dict] = None, profile: Optional[str] = None) -> str:
    """The README's headline table (Markdown) for one config and profile of a results dict:
    one row per implementation with its FLOPs, throughput at the largest batch, latency at the
    latency batches, speed-ups over DeiT dense (and ToMe, the gated reference), each with its spread.
    Implementations that did not run are listed with why."""
    config = config or results["configs"][0]
    profile = profile or results["settings"]["headline_profile"]
    records = _records(results, config, profile)
    batches = sorted({r["batch"] for r in records})
    big = max(batches)
    lat = [b for b in results["settings"]["latency_batches"] if b in batches]
    vs_deit = sorted(set(lat[:1] + [big]))
    by = {(r["implementation"], r["batch"]): r for r in records}
    has_tome = any(r.get("speedup_vs_tome") is not None for r in records)
    head = (["implementation", "GFLOPs/img", f"img/s @ b={big}"] + [f"p50 ms @ b={b}" for b in lat]
            + [f"vs DeiT @ b={b}" for b in vs_deit] + ([f"vs ToMe @ b={big}"] if has_tome else [])
            + [f"vs reference @ b={big}", f"TFLOP/s @ b={big}"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for name in results["implementations"]:
        mine = {b: by.get((name, b)) for b in batches}
        if not any(r and r["status"] == "ok" for r in mine.values()):
            reason = next((r.get("reason") for r in mine.values() if r and r.get("reason")), "not run")
            notes.append(f"- **{name}**: not measured: {reason}")
            continue
        at_big = mine[big]
        flops = next(r["flops_per_image"] for r in mine.values() if r)
        cells = ([name, f"{flops / 1e9:.2f}", rate_cell(at_big)] + [time_cell(mine[b]) for b in lat]
                 + [ratio_cell(mine[b], "vs_deit") for b in vs_deit]
                 + ([ratio_cell(at_big, "vs_tome")] if has_tome else [])
                 + [ratio_cell(at_big, "vs_reference"),
                    _fmt(at_big.get("tflops"), 4) if at_big and at_big["status"] == "ok" else "n/a"])
        rows.append("| " + " | ".join(cells) + " |")
    spread = any("p10_ms" in r for r in records)
    return "\n".join([caption(results, config, profile), ""] + rows + ([""] + notes if notes else [])
                     + (["", LEGEND] if spread else []))


@dataclass(frozen=True)
class Target:
    """A speed-up of ours over ``baseline`` (``speedup_<label>`` of our record, timed in the same
    rounds) at the run's largest batch (``throughput``) or its first latency batch (``latency``),
    that must reach ``at_least``; ``ours``: our implementation held to it per backend (None: none)."""
    what: str
    baseline: str
    label: str
    batch: str
    at_least: float
    ours: tuple


OURS = ("packed", "triton", "cuda")
# Issue 19's targets, set for Base, bf16, 224 px, the paper profile, on a GPU (256 and 1 are the
# headline's largest and latency batch).
TARGETS = (
    Target("throughput vs DeiT (both eager)", "deit-dense", "vs_deit", "throughput", 1.35, OURS),
    Target("throughput vs ToMe at the same FLOPs (both eager)", "tome", "vs_tome", "throughput", 1.05, OURS),
    Target("p50 latency vs DeiT, CUDA graph on both sides (latency <= 1.0x)", "deit-dense+graph",
           "vs_deit_graph", "latency", 1.0, tuple(f"{name}+graph" for name in OURS)),
    Target("throughput vs the public code's execution (`reference`)", "reference", "vs_reference",
           "throughput", 1.5, OURS),
    Target("throughput vs torch `varlen_attn` per step (whole forward, not attention alone)", "varlen_attn",
           "vs_varlen_attn", "throughput", 0.9, (None, "triton", None)),
)


def target_batches(settings: dict) -> dict:
    """{"throughput": the run's largest batch, "latency": its first latency batch (else its smallest)},
    as the run was asked for: a run stopped before a batch leaves that target not measured."""
    batches = sorted(set(settings["batch_sizes"]) | set(settings["latency_batches"]))
    return {"throughput": batches[-1], "latency": (settings["latency_batches"] or batches)[0]}


def target_cell(record: Optional[dict], target: Target, baseline: Optional[dict]) -> str:
    """``1.42x (1.38-1.47) met`` / ``not met``, ``~`` when the p10-p90 range contains the target;
    why not, where either side was not measured."""
    if not record or record["status"] != "ok":
        return "not measured: " + (record["status"] if record else "not in this run")
    if not baseline or baseline["status"] != "ok":
        return f"no {target.baseline}: " + (baseline["status"] if baseline else "not in this run")
    value, low, high = (record.get(f"speedup_{target.label}{s}") for s in ("", "_p10", "_p90"))
    if value is None:
        return "n/a"
    cell = f"{value:.2f}x" + (f" ({low:.2f}-{high:.2f})" if low is not None else "")
    cell += " met" if value >= target.at_least else " not met"
    return cell + (" ~" if low is not None and low <= target.at_least <= high else "")


def targets_table(results: dict, config: Optional[dict] = None, profile: Optional[str] = None) -> str:
    """The targets (:data:`TARGETS`) held against one config and profile of a results dict: one row
    per target, one column per backend of ours, each cell its ratio with spread and met / not met."""
    config = config or results["configs"][0]
    profile = profile or results["settings"]["headline_profile"]
    at = target_batches(results["settings"])
    by = {(r["implementation"], r["batch"]): r for r in _records(results, config, profile)}
    dev = results["device"]
    text = (f"Targets, held against {dev['name']}, Edge-RecViT-{config['scale'].capitalize()}, "
            f"{config['dtype']}, {config['img_size']}px, depth profile '{profile}': each a speed-up of ours "
            f"over the baseline timed in the same rounds, the median of the per-round ratios (p10-p90); "
            f"met when the median reaches the target, `~` when the p10-p90 range contains it (noise "
            f"cannot decide).")
    if (config["scale"], config["dtype"], config["img_size"], dev["device_type"]) != ("base", "bf16", 224, "cuda"):
        text += " The targets are set for Base, bf16, 224 px on a GPU: this run is not that one."
    rows = ["| target | needed | " + " | ".join(OURS) + " |", "|" + "---|" * (2 + len(OURS))]
    for target in TARGETS:
        batch = at[target.batch]
        cells = [f"{target.what} @ b={batch}", f">= {target.at_least:.2f}x"]
        cells += [target_cell(by.get((name, batch)), target, by.get((target.baseline, batch)))
                  if name else "-" for name in target.ours]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([text, ""] + rows)


def noise_summary(results: dict) -> str:
    """One sentence: how many comparisons the noise leaves unranked, how many times are noisy."""
    ok = [r for r in results["records"] if r["status"] == "ok"]
    pairs = [r for r in ok for label in ("vs_deit", "vs_reference", "vs_tome")
             if r.get(f"speedup_{label}_ranked") is not None]
    unranked = [r for r in ok for label in ("vs_deit", "vs_reference", "vs_tome")
                if r.get(f"speedup_{label}_ranked") is False]
    noisy = [r for r in ok if r.get("noisy")]
    text = (f"Noise: {len(unranked)} of {len(pairs)} comparisons cannot be ranked (p10-p90 of the "
            f"per-round ratio contains 1); {len(noisy)} of {len(ok)} times spread more than "
            f"{NOISY_SPREAD:g}x between p10 and p90.")
    dev = results["device"]
    if "wall_s" in results:
        text += f" The run took {results['wall_s']:.0f} s."
    if dev.get("load_average") is not None:
        text += (f" Load average {dev['load_average']} at the start, {dev.get('load_average_end')} at the end, "
                 f"on {dev.get('cpu_count')} cores.")
    if noisy or unranked:
        text += (" On a shared or throttling machine rerun with more time per figure (--target-s) or "
                 "fewer threads in use by others before reading those.")
    return text


def verdict(results: dict, ours: str = "packed") -> Optional[str]:
    """One line for the quick run: our speed-up over DeiT dense (and ToMe) at each batch, with spread."""
    config, profile = results["configs"][0], results["settings"]["headline_profile"]
    mine = sorted((r for r in _records(results, config, profile)
                   if r["implementation"] == ours and r["status"] == "ok"), key=lambda r: r["batch"])
    if not mine:
        return None
    parts = []
    for label, what in (("vs_deit", "DeiT dense"), ("vs_tome", "ToMe at the same FLOPs")):
        cells = [f"{ratio_cell(r, label)} at batch {r['batch']}" for r in mine
                 if r.get(f"speedup_{label}") is not None]
        if cells:
            parts.append(f"over {what}: " + ", ".join(cells))
    return f"Ours ({ours}) " + "; ".join(parts) + "." if parts else None


def fastest_line(results: dict) -> Optional[str]:
    """One plain line for the end of the quick run: at each batch of the headline configuration, the
    implementation with the lowest median time and how much faster it is than the next; or, when the
    p25-p75 ranges of the fastest and others overlap, that noise could not rank them."""
    config, profile = results["configs"][0], results["settings"]["headline_profile"]
    timed = [r for r in _records(results, config, profile) if r["status"] == "ok" and "p25_ms" in r]
    parts = []
    for batch in sorted({r["batch"] for r in timed}):
        ranked = sorted((r for r in timed if r["batch"] == batch), key=lambda r: r["p50_ms"])
        best = ranked[0]
        if len(ranked) == 1:
            parts.append(f"batch {batch}: only {best['implementation']} ran")
            continue
        tied = [r["implementation"] for r in ranked[1:] if r["p25_ms"] <= best["p75_ms"]]
        if tied:
            parts.append(f"batch {batch}: noise could not rank {best['implementation']} and {', '.join(tied)} "
                         f"(their p25-p75 times overlap)")
        else:
            runner_up = ranked[1]
            parts.append(f"batch {batch}: {best['implementation']}, {runner_up['p50_ms'] / best['p50_ms']:.2f}x "
                         f"faster than the next, {runner_up['implementation']} ({_fmt(best['p50_ms'])} vs "
                         f"{_fmt(runner_up['p50_ms'])} ms median)")
    return "Fastest: " + "; ".join(parts) + "." if parts else None


def markdown_report(results: dict) -> str:
    """Full Markdown report: environment, the paper profile, and one table per config and profile."""
    dev = results["device"]
    lines = ["# recvit benchmark results", "",
             f"Device: **{dev['name']}** ({dev['device_type']}), driver {dev.get('driver')}, "
             f"torch {dev['torch']}, CUDA {dev['cuda']}, triton {dev['triton']}, "
             f"commit `{dev['git_commit']}`{' (dirty tree)' if dev.get('git_dirty') else ''}, "
             f"{dev['date_utc']}, {dev['torch_threads']} torch threads.", "",
             "Generated by `python -m benchmarks.run`; do not edit by hand. Ratios compare "
             "implementations of one run only. Times are per-call times after warm-up, the "
             "implementations taking turns round by round, inputs rotated among several batches. "
             "Peak memory is torch's allocator peak on a GPU and not measured on the CPU (n/a). "
             "TFLOP/s counts the FLOPs (supplement conventions, recvit.flops) of each implementation's "
             "own work: Edge-RecViT's active FLOPs for every Edge-RecViT implementation, the dense "
             "model's for DeiT, the merged token counts' for ToMe.", "", LEGEND, "",
             noise_summary(results), "",
             f"Paper depth profile (ours; the paper gives only its sums): active tokens of a 197-token "
             f"image at steps 1..12 = {list(results['paper_profile']['active_tokens_224'])}, "
             f"sum alpha = {results['paper_profile']['sum_alpha']}, sum alpha^2 = "
             f"{results['paper_profile']['sum_alpha_sq']}. At other token counts N_l = round(alpha_l N0).",
             "", "## Implementations", ""]
    if not results.get("complete", True):
        lines[2:2] = [f"**Partial**: the run had not ended when this was written; these are its first "
                      f"{len(results['records'])} measurements.", ""]
    lines += [f"- **{name}**: {text}" for name, text in results["implementations"].items()]
    if results["configs"]:
        lines += ["", "## Targets", "", targets_table(results)]
    for config in results["configs"]:
        for profile in results["settings"]["profiles"]:
            if not _records(results, config, profile):
                continue  # not reached (yet) by a partial run
            lines += ["", f"## {config['scale']} / {config['dtype']} / {config['img_size']}px / "
                      f"profile {profile}", "", headline_table(results, config, profile), "",
                      "| implementation | batch | img/s | p50 ms (p10-p90) | p99 ms | min-max ms | peak MiB "
                      "| TFLOP/s | vs DeiT | vs ToMe | vs reference |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in _records(results, config, profile):
                if r["status"] != "ok":
                    continue
                lines.append(f"| {r['implementation']} | {r['batch']} | {rate_cell(r)} | {time_cell(r)} | "
                             f"{_fmt(r['p99_ms'])} | {_fmt(r.get('min_ms'))}-{_fmt(r.get('max_ms'))} | "
                             f"{_fmt(r['peak_memory_mb'], 0)} | {_fmt(r.get('tflops'), 4)} | "
                             f"{ratio_cell(r, 'vs_deit')} | {ratio_cell(r, 'vs_tome')} | "
                             f"{ratio_cell(r, 'vs_reference')} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_root: Path, plots: bool = True) -> Path:
    """Write results.json, results.md (and PNGs) to ``out_root/<device slug>/``; returns the folder.
    Each file is written whole under a temporary name, then renamed: a run killed while writing
    leaves the previous version, never half a file."""
    folder = Path(out_root) / device_slug(results["device"])
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=1) + "\n"),
                       ("results.md", markdown_report(results))):
        partial = folder / f".{name}.partial"
        partial.write_text(text)
        os.replace(partial, folder / name)
    if plots:
        from .plot import plot

        plot(results, folder)
    return folder
