"""Throughput / latency harness: Edge-RecViT implementations side by side with what a user would
run instead (a dense DeiT, eager and in a CUDA graph; ToMe token merging at the same FLOPs).

``recvit bench`` (:func:`main`) runs a quick comparison that shows the point on the present device;
``recvit bench --full`` (or ``python -m benchmarks.run``) runs the whole harness and writes
``results.json``, ``results.md`` and PNG plots to ``<out>/<device>/``.

Every implementation is a callable ``fn(images, depths) -> logits`` over the same images and the
same per-token depths (``depths=None``: the model's own ranker). An implementation that cannot run
here is recorded with its reason, never dropped. The implementations take turns, one call each
per round, and every figure is reported with its spread over the rounds. Ratios are only ever
taken within one run.

The parts, each readable alone:

- :mod:`.profiles`: depth profiles (the paper's, uniform, all-shallow, all-deep, the ranker's)
- :mod:`.baselines`: the dense DeiT (:class:`DeiTDense`, the stable name of the dense baseline),
  CUDA-graph capture of a dense model, Edge-RecViT written per step by hand
- :mod:`.tome`: ToMe token merging on the DeiT, its FLOPs and the r that matches a FLOP budget
- :mod:`.implementations`: the registry of what is timed
- :mod:`.timer`: interleaved timing, one synchronised call, percentiles, paired ratios
- :mod:`.settings`: what a run measures by default, and the device record
- :mod:`.runner`: the run itself
- :mod:`.report` / :mod:`.plot`: tables (the targets' too), Markdown, files, PNGs
- :mod:`.cli`: the command line
"""
from .baselines import DeiTDense, Unavailable, capture_graph, dense_flops, scaled_varlen_call
from .cli import default_results_root, main, settings_from_args
from .implementations import Implementation, implementations
from .profiles import (PAPER_ACTIVE_TOKENS_224, PAPER_ALPHA, PROFILES, active_counts, alpha_sums,
                       profile_alpha, profile_depths)
from .report import TARGETS, headline_table, markdown_report, noise_summary, targets_table, write_results
from .runner import run
from .settings import DTYPES, SCALES, Settings, default_settings, device_info, device_slug
from .timer import paired_ratio, percentile, summarize, time_interleaved
from .tome import ToMe, bipartite_soft_matching, choose_r, merge_wavg, tome_flops

__all__ = ["DeiTDense", "Unavailable", "capture_graph", "dense_flops", "scaled_varlen_call",
           "default_results_root", "main", "settings_from_args", "Implementation", "implementations",
           "PAPER_ACTIVE_TOKENS_224", "PAPER_ALPHA", "PROFILES", "active_counts", "alpha_sums",
           "profile_alpha", "profile_depths", "TARGETS", "headline_table", "markdown_report", "noise_summary",
           "targets_table", "write_results", "run", "DTYPES", "SCALES", "Settings", "default_settings", "device_info",
           "device_slug", "paired_ratio", "percentile", "summarize", "time_interleaved", "ToMe",
           "bipartite_soft_matching", "choose_r", "merge_wavg", "tome_flops"]
