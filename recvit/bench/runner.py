"""The run: for every config (scale, dtype, resolution), depth profile and batch, build each
implementation, time them interleaved, and record every figure with its spread (see :mod:`.timer`).

The results dictionary holds ``device``, ``settings``, ``paper_profile``, ``implementations``
(name -> description), ``configs``, ``records`` (one per config, profile, implementation and
batch: ``status`` ok / unavailable / failed / oom / skipped, with its ``reason`` when not ok) and
``complete`` (False in the partial results handed to ``on_batch`` while the run goes on).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch

from ..models.registry import create_model
from ..flops import count_flops
from .baselines import DeiTDense, Unavailable, dense_flops, first_line
from .implementations import Implementation, implementations, paper_profile_flops, tome_r
from .profiles import PAPER_ACTIVE_TOKENS_224, PAPER_ALPHA, alpha_sums, profile_depths
from .settings import DTYPES, SCALES, Settings, device_info, load_average
from .timer import paired_ratio, peak_memory, summarize, time_interleaved
from .tome import tome_flops

# (baseline, label): every record timed beside the baseline gets speedup_<label> (with p10, p90, ranked),
# its per-round ratio; deit-dense+graph and varlen_attn for the targets (report.TARGETS).
BASELINES = (("deit-dense", "vs_deit"), ("tome", "vs_tome"), ("reference", "vs_reference"),
             ("deit-dense+graph", "vs_deit_graph"), ("varlen_attn", "vs_varlen_attn"))


class _NoProgress:
    """Stands in for a tqdm bar when progress is off (tqdm is then never imported)."""

    def update(self, n=1):
        pass

    def set_postfix_str(self, text, refresh=True):
        pass

    def close(self):
        pass


def select(names: Optional[list[str]], force_compile: bool = False) -> list[Implementation]:
    """The implementations named (all for None), in report order; ValueError naming unknown ones."""
    impls = implementations(force_compile)
    if names is None:
        return impls
    unknown = sorted(set(names) - {impl.name for impl in impls})
    if unknown:
        raise ValueError(f"implementations: unknown {unknown}; expected names from "
                         f"{[impl.name for impl in impls]}")
    return [impl for impl in impls if impl.name in names]


def _make_models(scale: str, img_size: int, dtype: torch.dtype, device: torch.device):
    dim, heads = SCALES[scale]
    model = create_model(f"edge_recvit_{scale}", img_size=img_size).eval().to(device, dtype)
    deit = DeiTDense(img_size, embed_dim=dim, num_heads=heads).eval().to(device, dtype)
    return model, deit


def run(settings: Settings, progress: bool = True,
        on_batch: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the harness; returns the results dictionary (see :func:`~recvit.bench.write_results`).
    ``on_batch(results)`` is called with the results so far each time a batch's records are in
    (``complete`` False): a caller writes them, so that a run cut off keeps what it measured."""
    threads, start = torch.get_num_threads(), time.perf_counter()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        results = _run(settings, progress, on_batch)
    finally:
        torch.set_num_threads(threads)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    return results


def _run(settings: Settings, progress: bool, on_batch: Optional[Callable[[dict], None]]) -> dict:
    device = torch.device(settings.device)
    impls = select(settings.implementations, settings.force_compile)
    configs = [(s, dt, r) for s in settings.scales for dt in settings.dtypes for r in settings.img_sizes]
    steps = sum(len(_batches(settings, profile)) * len(impls) for profile in settings.profiles) * len(configs)
    results = {"device": device_info(device), "settings": dataclasses.asdict(settings),
               "paper_profile": {"active_tokens_224": PAPER_ACTIVE_TOKENS_224,
                                 "alpha": [round(a, 4) for a in PAPER_ALPHA],
                                 "sum_alpha": round(sum(PAPER_ALPHA), 4),
                                 "sum_alpha_sq": round(sum(a * a for a in PAPER_ALPHA), 4)},
               "implementations": {impl.name: impl.description for impl in impls},
               "configs": [], "records": [], "complete": False}
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="recvit bench", unit="run")
    else:
        bar = _NoProgress()
    generator = torch.Generator().manual_seed(settings.seed)
    for scale, dtype_name, img_size in configs:
        torch.manual_seed(settings.seed)
        dtype = DTYPES[dtype_name]
        model, deit = _make_models(scale, img_size, dtype, device)
        r = tome_r(model, deit)
        config = {"scale": scale, "dtype": dtype_name, "img_size": img_size, "tokens": model.num_tokens,
                  "dense_flops": dense_flops(deit), "recvit_paper_flops": paper_profile_flops(model),
                  "tome_r": r, "tome_flops": tome_flops(deit, r)}
        results["configs"].append(config)
        for profile in settings.profiles:
            _run_profile(results, settings, model, deit, impls, config, profile, device, dtype,
                         generator, bar, on_batch)
        del model, deit
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    results["device"]["load_average_end"] = load_average()
    results["complete"] = True
    return results


def _batches(settings: Settings, profile: str) -> list[int]:
    batches = settings.batch_sizes if profile == settings.headline_profile else settings.profile_batch_sizes
    return sorted(set(batches) | set(settings.latency_batches))


def _run_profile(results, settings, model, deit, impls, config, profile, device, dtype, generator, bar,
                 on_batch):
    built: dict = {}
    failed_at: dict = {}  # implementation -> batch at which it ran out of memory
    where = f"{config['scale']} {config['dtype']} {config['img_size']} {profile}"
    for batch in _batches(settings, profile):
        inputs = []
        for _ in range(settings.rotate):
            images = torch.randn(batch, 3, config["img_size"], config["img_size"], generator=generator)
            depths = profile_depths(profile, batch, config["tokens"], model.num_steps, generator)
            inputs.append((images.to(device, dtype), None if depths is None else depths.to(device)))
        with torch.inference_mode():
            realised = torch.cat([(d if d is not None else model(x, return_aux=True).depths)
                                  for x, d in inputs]).cpu()
        flops = count_flops(model, realised).total
        sums = alpha_sums(realised, model.num_steps)
        records, fns = {}, {}
        for impl in impls:
            own = impl.flops(model, deit) if impl.flops is not None else None
            records[impl.name] = {
                **{k: config[k] for k in ("scale", "dtype", "img_size", "tokens")},
                "profile": profile, "implementation": impl.name, "batch": batch,
                "sum_alpha": round(sums[0], 4), "sum_alpha_sq": round(sums[1], 4),
                "flops_per_image": flops if own is None else own,
                "flops_source": "recvit.flops.count_flops" if own is None else "fixed (does not follow the depths)"}
            bar.set_postfix_str(f"{where} b={batch} build {impl.name}", refresh=False)
            if impl.headline_only and profile != settings.headline_profile:
                records[impl.name].update(status="skipped", reason="timed for the headline depth profile only")
            elif impl.name in failed_at:
                records[impl.name].update(status="oom", reason=f"out of memory at batch {failed_at[impl.name]}")
            else:
                outcome = _guarded(lambda: _build(impl, model, deit, inputs[0], built), batch, failed_at,
                                   impl.name, device)
                if isinstance(outcome, dict):
                    records[impl.name].update(outcome)
                else:
                    fns[impl.name] = outcome
        bar.set_postfix_str(f"{where} b={batch} timing {len(fns)} implementations", refresh=False)
        latency = batch in settings.latency_batches
        min_repeats = max(settings.min_repeats, settings.latency_repeats if latency else 0)
        with torch.inference_mode():
            times = time_interleaved(fns, inputs, device, settings.warmup, min_repeats,
                                     max(settings.max_repeats, min_repeats), settings.target_s)
        for name, outcome in times.items():
            if isinstance(outcome, BaseException):
                records[name].update(_failure(outcome, batch, failed_at, name, device))
                continue
            with torch.inference_mode():
                memory = _guarded(lambda: peak_memory(fns[name], inputs[0], device), batch, failed_at,
                                  name, device)
            stats = summarize(outcome)
            records[name].update(status="ok", repeats=len(outcome), **stats, images_per_s=batch / (
                stats["p50_ms"] / 1e3), tflops=records[name]["flops_per_image"] * batch / stats["p50_ms"] / 1e9,
                peak_memory_mb=memory / 2 ** 20 if isinstance(memory, int) else None)
        for name, record in records.items():
            for base, label in BASELINES:
                mine, theirs = times.get(name), times.get(base)
                if record["status"] == "ok" and isinstance(theirs, list):
                    ratio = paired_ratio(theirs, mine)
                    record[f"speedup_{label}"] = ratio["ratio"]
                    record[f"speedup_{label}_p10"], record[f"speedup_{label}_p90"] = ratio["p10"], ratio["p90"]
                    record[f"speedup_{label}_ranked"] = ratio["ranked"] if name != base else None
                else:
                    record[f"speedup_{label}"] = None
        results["records"] += list(records.values())
        bar.update(len(impls))
        if on_batch is not None:
            on_batch(results)


def _build(impl, model, deit, example, built):
    with torch.inference_mode():
        if impl.name.endswith("+graph") or impl.name not in built:
            # a CUDA graph is captured for one input shape: it is rebuilt for every batch
            built[impl.name] = impl.build(model, deit, *example)
    return built[impl.name]


def _guarded(action, batch, failed_at, name, device):
    """``action()``, or the failure record of the exception it raised."""
    try:
        return action()
    except Exception as error:  # recorded with its reason, the run goes on
        return _failure(error, batch, failed_at, name, device)


def _failure(error, batch, failed_at, name, device) -> dict:
    if isinstance(error, Unavailable):
        return {"status": "unavailable", "reason": str(error)}
    if isinstance(error, torch.cuda.OutOfMemoryError):
        failed_at[name] = batch
        torch.cuda.empty_cache()
        return {"status": "oom", "reason": f"out of memory at batch {failed_at[name]}"}
    return {"status": "failed", "reason": f"{type(error).__name__}: {first_line(error)}"}
