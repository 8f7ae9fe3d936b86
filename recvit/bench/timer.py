"""Timing: the implementations take turns, one call each per round (:func:`time_interleaved`), and
every figure is reported with its spread over those rounds (:func:`summarize`, :func:`paired_ratio`).

On a shared or throttling machine identical runs can differ several-fold in absolute speed; what
one round sees (load, clock), every implementation in it sees too. So a ratio is taken per round
(``paired_ratio``) and its spread over the rounds says whether the two can be ranked at all.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch

# A figure whose p90 / p10 exceeds this is flagged noisy: the machine changed speed under it.
NOISY_SPREAD = 1.5


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a GPU's); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable, device: torch.device) -> tuple:
    """``(fn(), seconds)``: the wall-clock time of one call, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def time_interleaved(fns: dict, inputs: Sequence[tuple], device: torch.device, warmup: int,
                     min_repeats: int, max_repeats: int, target_s: float,
                     on_round: Optional[Callable[[dict], None]] = None) -> dict:
    """Seconds per call of each ``fns[name](*inputs[i % len(inputs)])``: name -> list of times, or
    the exception that implementation raised.

    The implementations take turns, one call each per round, so that a change of machine load or
    clock during the measurement reaches all of them alike. ``warmup`` untimed rounds first; then
    as many rounds as fit ``target_s`` per implementation (estimated from the warm-up), clamped to
    [min_repeats, max_repeats]. CUDA events around each call on a GPU (read after one final
    synchronize), ``time.perf_counter`` on the CPU. ``on_round(outcome so far)``, where given, is
    called after each round (the device synchronised first): a caller writes it, so that a run cut
    off keeps the rounds it timed.
    """
    outcome: dict = {}
    live = dict(fns)

    def call(name, i):
        try:
            return live[name](*inputs[i % len(inputs)])
        except Exception as error:  # the implementation is dropped with its reason
            outcome[name] = error
            del live[name]

    start = time.perf_counter()
    for i in range(max(1, warmup)):
        for name in list(live):
            call(name, i)
    synchronize(device)
    per_round = (time.perf_counter() - start) / max(1, warmup)
    rounds = int(min(max_repeats, max(min_repeats, target_s * max(1, len(live)) / max(per_round, 1e-6))))
    times: dict = {name: [] for name in live}

    def seconds() -> dict:
        return {**outcome, **{name: [b.elapsed_time(e) / 1e3 for b, e in times[name]] if device.type == "cuda"
                              else list(times[name]) for name in live}}

    for i in range(rounds):
        for name in list(live):
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                call(name, i)
                end.record()
                times[name].append((begin, end))
            else:
                begin = time.perf_counter()
                call(name, i)
                times[name].append(time.perf_counter() - begin)
        if on_round is not None:
            synchronize(device)
            on_round(seconds())
    synchronize(device)
    return seconds()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def peak_memory(fn: Callable, args: tuple, device: torch.device) -> Optional[int]:
    """Peak bytes allocated by torch during one call on a GPU; None on the CPU (not measured)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def saved_activation_bytes(model, forward) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for the backward while
    ``forward()`` runs (``model``'s parameters excluded): the activation memory of training, on
    any device."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values())


def summarize(seconds: Sequence[float]) -> dict:
    """Per-call times (s) -> p10/p25/p50/p75/p90/p99/min/max in ms, and ``noisy`` (p90 / p10 > NOISY_SPREAD)."""
    stats = {f"p{q}_ms": percentile(seconds, q) * 1e3 for q in (10, 25, 50, 75, 90, 99)}
    stats.update(min_ms=min(seconds) * 1e3, max_ms=max(seconds) * 1e3, median_ms=stats["p50_ms"],
                 noisy=stats["p90_ms"] > NOISY_SPREAD * stats["p10_ms"])
    return stats


def paired_ratio(base: Sequence[float], mine: Sequence[float]) -> dict:
    """Speed-up of ``mine`` over ``base`` from the same interleaved rounds: base_i / mine_i per round.

    Returns the median, p10 and p90 of the per-round ratios and ``ranked``: False when [p10, p90]
    contains 1, i.e. the noise is too wide to say which of the two is faster.
    """
    if len(base) != len(mine) or not base:
        raise ValueError(f"base, mine: expected the same non-zero number of rounds, got {len(base)} "
                         f"and {len(mine)}")
    ratios = [b / m for b, m in zip(base, mine)]
    low, high = percentile(ratios, 10), percentile(ratios, 90)
    return {"ratio": percentile(ratios, 50), "p10": low, "p90": high, "ranked": not low <= 1.0 <= high}
