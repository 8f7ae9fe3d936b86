"""Throughput / latency harness: Edge-RecViT implementations side by side with a dense DeiT.

``recvit bench`` (``main``) runs a quick side-by-side of the model backends on the present device;
``recvit bench --full`` (or ``python -m benchmarks.run``) runs the whole harness and writes
``results.json``, ``results.md`` and PNG plots to ``benchmarks/results/<device>/``.

Every implementation is a callable ``fn(images, depths) -> logits`` over the same images and the
same per-token depths (``depths=None``: the model's own ranker). An implementation that cannot run
here is recorded with its reason, never dropped. Times are medians of per-call times after a
warm-up, with the inputs rotated among several pre-made batches: CUDA events on a GPU,
``time.perf_counter`` on the CPU. Ratios are only ever taken within one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import recvit_kernels as rk

from .edge_recvit import EdgeRecViT, _init_weights
from .factory import create_model
from .flops import count_flops
from .layers import Block, PatchEmbed

SCALES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The paper's depth profile (supplement eq. 17: sum alpha_l = 8.21, sum alpha_l^2 = 6.64, L = 12).
# The paper does not print its histogram; this one is ours: N_l, the active tokens of a 224x224
# image (N0 = 197, [CLS] included) at steps 1..12. No token exits before step 4, then about 20
# tokens leave per step and 35 run all 12 steps. alpha_l = N_l / 197 gives sum 8.2081 and
# sum of squares 6.6439, i.e. 8.21 and 6.64 to two decimals.
PAPER_ACTIVE_TOKENS_224 = (197, 197, 197, 197, 173, 154, 134, 114, 93, 73, 53, 35)
PAPER_ALPHA = tuple(n / 197 for n in PAPER_ACTIVE_TOKENS_224)
PROFILES = ("paper", "uniform", "all-shallow", "all-deep", "ranker")


class Unavailable(Exception):
    """An implementation cannot run in this setting; the message says why."""


# ----------------------------------------------------------------------------------------------
# Models and depth profiles


class DeiTDense(nn.Module):
    """A plain pre-norm ViT (DeiT) of the same scale: patch embed + [CLS] + positions, ``depth``
    :class:`~recvit.layers.Block` layers with SDPA, final norm, classifier on [CLS]."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_classes: int = 1000,
                 embed_dim: int = 768, num_heads: int = 12, depth: int = 12, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def profile_alpha(profile: str, num_steps: int) -> Optional[tuple[float, ...]]:
    """alpha_l (fraction of an image's tokens active at step l) of a named profile; None = ranker."""
    if profile == "paper":
        if num_steps != len(PAPER_ALPHA):
            raise ValueError(f"profile='paper' is defined for L = 12, got num_steps={num_steps}")
        return PAPER_ALPHA
    if profile == "uniform":  # depths spread evenly over 1..L
        return tuple((num_steps - l + 1) / num_steps for l in range(1, num_steps + 1))
    if profile == "all-shallow":  # every patch token exits after step 1; [CLS] runs all steps
        return (1.0,) + (0.0,) * (num_steps - 1)
    if profile == "all-deep":
        return (1.0,) * num_steps
    if profile == "ranker":
        return None
    raise ValueError(f"profile={profile!r}: expected one of {PROFILES}")


def active_counts(alpha: Sequence[float], tokens: int) -> list[int]:
    """Per-step active-token counts N_l = round(alpha_l * N0), non-increasing, N_1 = N0, N_L >= 1."""
    counts = [tokens] + [max(1, min(tokens, round(a * tokens))) for a in alpha[1:]]
    for i in range(1, len(counts)):
        counts[i] = min(counts[i], counts[i - 1])
    return counts


def profile_depths(profile: str, batch: int, tokens: int, num_steps: int,
                   generator: torch.Generator) -> Optional[torch.Tensor]:
    """(batch, tokens) int64 depths on the CPU following ``profile``; None for ``ranker``.

    Every image gets the profile's active counts; which patch tokens get which depth is drawn
    at random per image. [CLS] (column 0) always gets depth L.
    """
    alpha = profile_alpha(profile, num_steps)
    if alpha is None:
        return None
    counts = active_counts(alpha, tokens) + [0]
    per_depth = [counts[d - 1] - counts[d] for d in range(1, num_steps + 1)]  # tokens of depth d
    values = torch.repeat_interleave(torch.arange(1, num_steps + 1), torch.tensor(per_depth))
    values = values.flip(0)  # depth L first: [CLS] takes one of them
    depths = torch.empty(batch, tokens, dtype=torch.int64)
    for b in range(batch):
        depths[b, 0] = values[0]
        depths[b, 1:] = values[1:][torch.randperm(tokens - 1, generator=generator)]
    return depths


def alpha_sums(depths: torch.Tensor, num_steps: int) -> tuple[float, float]:
    """(mean over images of sum alpha_l, of sum alpha_l^2) realised by a (B, N0) depth map."""
    steps = torch.arange(1, num_steps + 1, device=depths.device)
    alpha = (depths[:, :, None] >= steps).double().mean(1)
    return float(alpha.sum(1).mean()), float((alpha ** 2).sum(1).mean())


def model_flops(model: EdgeRecViT, depths: torch.Tensor) -> tuple[float, str]:
    """Active FLOPs per image of ``model`` with ``depths``, and where the number comes from."""
    return count_flops(model, depths.cpu()).total, "recvit.flops.count_flops"


def dense_flops(deit: DeiTDense) -> float:
    """FLOPs per image of the dense model, same conventions: patch + depth x (24 N C^2 + 4 N^2 C)."""
    proj = deit.patch_embed.proj
    c, n0 = proj.out_channels, deit.pos_embed.shape[1]
    patch = 2.0 * (n0 - 1) * proj.in_channels * proj.kernel_size[0] ** 2 * c
    return patch + len(deit.blocks) * (24.0 * n0 * c * c + 4.0 * n0 * n0 * c)


# ----------------------------------------------------------------------------------------------
# Implementations


def _layer_on_rows(block: Block, rows: torch.Tensor, attend: Callable) -> torch.Tensor:
    """The pre-norm layer on packed (T, C) rows; ``attend(q, k, v, scale)`` on (T, H, D) mixes images."""
    attn = block.attn
    total, dim = rows.shape
    qkv = attn.qkv(block.norm1(rows)).view(total, 3, attn.num_heads, attn.head_dim)
    q, k, v = (t.contiguous() for t in qkv.unbind(1))
    rows = rows + attn.proj(attend(q, k, v, attn.scale).reshape(total, dim))
    return rows + block.mlp(block.norm2(rows))


def _recvit_forward(model: EdgeRecViT, images: torch.Tensor, depths: Optional[torch.Tensor],
                    run_step: Callable) -> torch.Tensor:
    """Edge-RecViT's forward with the recursion replaced: ``run_step(layer, x, active) -> x``."""
    tokens = model.embed(images)
    ranked = model.ranker(tokens)[2]
    if depths is None:
        depths = ranked.clone()
        depths[:, 0] = model.num_steps
    x = tokens
    for step in range(1, model.num_steps + 1):
        active = depths >= step
        x = run_step(model.recursion.layer_for_step(step), x, active)
    return model.head(model.norm(x)[:, 0])


def _gather_scatter_step(layer, x, active):
    """Per image, gather the active tokens into a padded batch, run the layer, index_copy back."""
    batch, tokens, dim = x.shape
    lengths = active.sum(1)
    width = int(lengths.max())
    if width == 0:
        return x
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :width]  # active first
    gathered = x.gather(1, order[..., None].expand(-1, -1, dim))
    valid = torch.arange(width, device=x.device) < lengths[:, None]
    out = layer(gathered, valid | ~valid.any(1, keepdim=True))
    flat = (order + tokens * torch.arange(batch, device=x.device)[:, None])[valid]
    return x.reshape(-1, dim).index_copy(0, flat, out[valid]).view(batch, tokens, dim)


def _packed_step(attend_factory):
    """Per step: index_select the active tokens (image-major), run the layer on them with the
    given varlen attention, index_copy them back."""

    def step(layer, x, active):
        batch, tokens, dim = x.shape
        index = active.reshape(-1).nonzero().squeeze(1)
        if index.numel() == 0:
            return x
        lengths = active.sum(1)
        offsets = F.pad(lengths.cumsum(0), (1, 0))
        flat = x.reshape(-1, dim)
        rows = _layer_on_rows(layer, flat.index_select(0, index), attend_factory(offsets, lengths))
        return flat.index_copy(0, index, rows).view(batch, tokens, dim)

    return step


def _nested_attend(offsets, lengths):
    warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")

    def attend(q, k, v, scale):
        nested = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*nested, scale=scale)
        return out.transpose(1, 2).values()

    return attend


def _varlen_attn_attend(offsets, lengths):
    from torch.nn.attention.varlen import varlen_attn

    cu = offsets.to(torch.int32)
    longest = int(lengths.max())

    def attend(q, k, v, scale):
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale)

    return attend


def _probe(attend_factory, device, dtype) -> Optional[str]:
    """None if the attention runs on a tiny two-image input here, else why not."""
    q = torch.randn(5, 2, 64, device=device, dtype=dtype)
    lengths = torch.tensor([2, 3], device=device)
    try:
        attend_factory(F.pad(lengths.cumsum(0), (1, 0)), lengths)(q, q, q, 0.125)
    except Exception as error:  # the reason is what we report
        return f"{type(error).__name__}: {_first_line(error)}"
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _graph_variant(model, backend: str, example_images, example_depths):
    """The model's forward with ``backend`` captured in one CUDA graph (recvit.graph)."""
    if not torch.cuda.is_available():
        raise Unavailable("CUDA graphs need a CUDA GPU")
    try:
        from .graph import compile_graph
    except ImportError as error:
        raise Unavailable(f"recvit.graph is not available: {error}") from None
    return compile_graph(model, example_images, depths=example_depths, backend=backend)


@dataclass
class Implementation:
    name: str
    description: str
    # build(model, deit, example_images, example_depths) -> fn(images, depths) or raise Unavailable
    build: Callable
    uses_depths: bool = True
    headline_only: bool = False  # timed for the headline depth profile only (slow to build)


def _backend_impl(backend: str):
    def build(model, deit, images, depths):
        reason = rk.unavailable_reason(backend)
        if reason is not None:
            raise Unavailable(reason)
        if backend == "triton" and images.device.type == "cpu":
            raise Unavailable("Triton runs only in its interpreter on the CPU: a correctness tool, "
                              "far too slow to time")
        return lambda x, d: model(x, depths=d, backend=backend)
    return build


def _graph_impl(backend: str):
    def build(model, deit, images, depths):
        _backend_impl(backend)(model, deit, images, depths)
        return _graph_variant(model, backend, images, depths)
    return build


def _with_probe(attend_factory, needs_import: Optional[str] = None):
    def build(model, deit, images, depths):
        if needs_import:
            try:
                __import__(needs_import)
            except ImportError as error:
                raise Unavailable(f"{needs_import} is not in torch {torch.__version__}: {error}") from None
        reason = _probe(attend_factory, images.device, images.dtype)
        if reason is not None:
            raise Unavailable(f"not supported on {images.device.type} / {images.dtype}: {reason}")
        step = _packed_step(attend_factory)
        return lambda x, d: _recvit_forward(model, x, d, step)
    return build


def _compile_impl(target: str):
    def build(model, deit, images, depths):
        if images.device.type != "cuda":
            raise Unavailable("torch.compile is skipped on the CPU (minutes to compile per shape); "
                              "pass --compile to force it")
        return _compiled(model, deit, target)
    return build


def _forced_compile_impl(target: str):
    return lambda model, deit, images, depths: _compiled(model, deit, target)


def _compiled(model, deit, target):
    torch._dynamo.reset()  # a fresh cache per build: never hit the recompile limit (silent eager)
    if target == "dense":
        compiled = torch.compile(deit)
        return lambda x, d: compiled(x)
    compiled = torch.compile(lambda x, d: model(x, depths=d, backend=target))
    return compiled


def implementations(force_compile: bool = False) -> list[Implementation]:
    """Every implementation the harness knows, in report order (DeiT dense first: the baseline)."""
    compile_impl = _forced_compile_impl if force_compile else _compile_impl
    impls = [
        Implementation("deit-dense", "DeiT of the same scale, 12 dense layers, SDPA",
                       lambda model, deit, images, depths: (lambda x, d: deit(x)), uses_depths=False),
        Implementation("reference", "Edge-RecViT as the public code runs it: every token through all "
                       "steps, updates gated (backend='eager')", _backend_impl("eager")),
        Implementation("gather-scatter", "eager per step: gather each image's active tokens into a "
                       "padded batch, run the layer, index_copy back",
                       lambda model, deit, images, depths: (
                           lambda x, d: _recvit_forward(model, x, d, _gather_scatter_step))),
        Implementation("nested-sdpa", "per step: index_select active tokens, nested jagged tensors "
                       "(torch.jagged) + SDPA, index_copy back", _with_probe(_nested_attend)),
        Implementation("varlen_attn", "per step: index_select active tokens, "
                       "torch.nn.attention.varlen.varlen_attn, index_copy back",
                       _with_probe(_varlen_attn_attend, "torch.nn.attention.varlen")),
    ]
    for backend in ("packed", "triton", "cuda"):
        impls.append(Implementation(backend, f"ours: depth-sorted prefix layout, backend='{backend}'",
                                    _backend_impl(backend)))
        impls.append(Implementation(f"{backend}+graph", f"ours: backend='{backend}', whole forward "
                                    "captured in one CUDA graph (recvit.graph)", _graph_impl(backend)))
    impls += [
        Implementation("deit-dense+compile", "DeiT dense through torch.compile", compile_impl("dense"),
                       uses_depths=False, headline_only=True),
        Implementation("reference+compile", "the gated reference through torch.compile",
                       compile_impl("eager"), headline_only=True),
        Implementation("packed+compile", "ours (packed) through torch.compile", compile_impl("packed"),
                       headline_only=True),
    ]
    return impls


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, inputs: Sequence[tuple], device: torch.device, warmup: int,
                     min_repeats: int, max_repeats: int, target_s: float) -> dict:
    """Seconds per call of each ``fns[name](*inputs[i % len(inputs)])``: name -> list of times, or
    the exception that implementation raised.

    The implementations take turns, one call each per round, so that a change of machine load or
    clock during the measurement reaches all of them alike. ``warmup`` untimed rounds first; then
    as many rounds as fit ``target_s`` per implementation (estimated from the warm-up), clamped to
    [min_repeats, max_repeats]. CUDA events around each call on a GPU (read after one final
    synchronize), ``time.perf_counter`` on the CPU.
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
    _sync(device)
    per_round = (time.perf_counter() - start) / max(1, warmup)
    rounds = int(min(max_repeats, max(min_repeats, target_s * max(1, len(live)) / max(per_round, 1e-6))))
    times: dict = {name: [] for name in live}
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
    _sync(device)
    for name in live:
        outcome[name] = [b.elapsed_time(e) / 1e3 for b, e in times[name]] if device.type == "cuda" \
            else times[name]
    return outcome


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


# ----------------------------------------------------------------------------------------------
# Settings and the run


@dataclass
class Settings:
    device: str
    scales: list[str]
    dtypes: list[str]
    img_sizes: list[int]
    batch_sizes: list[int]          # throughput sweep, for the headline profile
    profiles: list[str]
    profile_batch_sizes: list[int]  # the other profiles are timed at these batches only
    latency_batches: list[int] = field(default_factory=lambda: [1, 8])
    implementations: Optional[list[str]] = None  # None: all
    headline_profile: str = "paper"
    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 200
    target_s: float = 0.5
    latency_repeats: int = 100      # min repeats at the latency batches (p99 needs many)
    rotate: int = 4                 # pre-made input batches cycled through
    seed: int = 0
    force_compile: bool = False
    threads: Optional[int] = None   # torch CPU threads (None: torch's default)


def default_settings(device: str, full: bool = True) -> Settings:
    """The full GPU sweep, or the small CPU smoke mode (a few minutes on a laptop)."""
    if device == "cuda":
        if full:
            return Settings("cuda", ["tiny", "small", "base"], ["bf16", "fp16"], [224, 384],
                            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512], list(PROFILES), [1, 8, 64, 256])
        return Settings("cuda", ["base"], ["bf16"], [224], [1, 8, 64, 256], ["paper"], [1, 8, 64, 256],
                        implementations=["deit-dense", "reference", "packed", "packed+graph", "triton",
                                         "triton+graph", "cuda", "cuda+graph"], target_s=0.3,
                        latency_repeats=50)
    if full:
        return Settings("cpu", ["tiny"], ["fp32"], [96], [1, 4, 16, 32], list(PROFILES), [1, 8],
                        warmup=2, min_repeats=5, max_repeats=60, target_s=0.4, latency_repeats=30)
    return Settings("cpu", ["tiny"], ["fp32"], [96], [1, 8], ["paper"], [1, 8],
                    implementations=["deit-dense", "reference", "packed", "triton", "cuda"],
                    warmup=2, min_repeats=5, max_repeats=30, target_s=0.2, latency_repeats=15)


def device_info(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "triton": _version("triton"), "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch_threads": torch.get_num_threads(), "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"sm_{props.major}{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1), driver=_nvidia_smi_driver(),
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(name=_cpu_name(), driver=None)
    return info


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _nvidia_smi_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(info: dict) -> str:
    """Folder name for a device: its name lower-cased, non-alphanumerics as '-', 'cpu-' on a CPU."""
    slug = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    return slug if info["device_type"] == "cuda" else f"cpu-{slug}"


def _make_models(scale: str, img_size: int, dtype: torch.dtype, device: torch.device):
    dim, heads = SCALES[scale]
    model = create_model(f"edge_recvit_{scale}", img_size=img_size).eval().to(device, dtype)
    deit = DeiTDense(img_size, embed_dim=dim, num_heads=heads).eval().to(device, dtype)
    return model, deit


def run(settings: Settings, progress: bool = True) -> dict:
    """Run the harness; returns the results dictionary (see :func:`write_results`)."""
    from tqdm import tqdm

    device = torch.device(settings.device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    impls = implementations(settings.force_compile)
    if settings.implementations is not None:
        unknown = set(settings.implementations) - {impl.name for impl in impls}
        if unknown:
            raise ValueError(f"implementations: unknown {sorted(unknown)}; expected names from "
                             f"{[impl.name for impl in impls]}")
        impls = [impl for impl in impls if impl.name in settings.implementations]
    configs = [(s, dt, r) for s in settings.scales for dt in settings.dtypes for r in settings.img_sizes]
    plan = []
    for config in configs:
        for profile in settings.profiles:
            batches = settings.batch_sizes if profile == settings.headline_profile else \
                settings.profile_batch_sizes
            batches = sorted(set(batches) | set(settings.latency_batches))
            plan += [(config, profile, impl, batch) for impl in impls for batch in batches]
    results = {"device": device_info(device), "settings": dataclasses.asdict(settings),
               "paper_profile": {"active_tokens_224": PAPER_ACTIVE_TOKENS_224,
                                 "alpha": [round(a, 4) for a in PAPER_ALPHA],
                                 "sum_alpha": round(sum(PAPER_ALPHA), 4),
                                 "sum_alpha_sq": round(sum(a * a for a in PAPER_ALPHA), 4)},
               "implementations": {impl.name: impl.description for impl in impls},
               "configs": [], "records": []}
    bar = tqdm(total=len(plan), desc="recvit bench", disable=not progress, unit="run")
    generator = torch.Generator().manual_seed(settings.seed)
    for scale, dtype_name, img_size in configs:
        torch.manual_seed(settings.seed)
        dtype = DTYPES[dtype_name]
        model, deit = _make_models(scale, img_size, dtype, device)
        tokens = model.num_tokens
        config = {"scale": scale, "dtype": dtype_name, "img_size": img_size, "tokens": tokens,
                  "dense_flops": dense_flops(deit)}
        results["configs"].append(config)
        for profile in settings.profiles:
            batches = sorted(set(settings.batch_sizes if profile == settings.headline_profile
                                 else settings.profile_batch_sizes) | set(settings.latency_batches))
            _run_profile(results, settings, model, deit, impls, config, profile, batches, device,
                         dtype, generator, bar)
        del model, deit
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return results


def _run_profile(results, settings, model, deit, impls, config, profile, batches, device, dtype,
                 generator, bar):
    built: dict = {}
    failed_at: dict = {}  # implementation -> batch at which it ran out of memory
    for batch in batches:
        inputs = []
        for _ in range(settings.rotate):
            images = torch.randn(batch, 3, config["img_size"], config["img_size"], generator=generator)
            depths = profile_depths(profile, batch, config["tokens"], model.num_steps, generator)
            inputs.append((images.to(device, dtype), None if depths is None else depths.to(device)))
        with torch.inference_mode():
            realised = [(d if d is not None else model(x, return_aux=True).depths) for x, d in inputs]
        flops = model_flops(model, torch.cat(realised))
        sums = alpha_sums(torch.cat(realised).cpu(), model.num_steps)
        records, fns = {}, {}
        for impl in impls:
            records[impl.name] = {
                **{k: config[k] for k in ("scale", "dtype", "img_size", "tokens")},
                "profile": profile, "implementation": impl.name, "batch": batch,
                "sum_alpha": round(sums[0], 4), "sum_alpha_sq": round(sums[1], 4),
                "flops_per_image": config["dense_flops"] if not impl.uses_depths else flops[0],
                "flops_source": "dense formula" if not impl.uses_depths else flops[1]}
            bar.set_postfix_str(f"{config['scale']} {config['dtype']} {config['img_size']} {profile} "
                                f"b={batch} build {impl.name}", refresh=False)
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
        bar.set_postfix_str(f"{config['scale']} {config['dtype']} {config['img_size']} {profile} "
                            f"b={batch} timing {len(fns)} implementations", refresh=False)
        latency = batch in settings.latency_batches
        min_repeats = max(settings.min_repeats, settings.latency_repeats if latency else 0)
        times = time_interleaved(fns, inputs, device, settings.warmup, min_repeats,
                                 max(settings.max_repeats, min_repeats), settings.target_s)
        for name, outcome in times.items():
            if isinstance(outcome, BaseException):
                records[name].update(_failure(outcome, batch, failed_at, name, device))
                continue
            memory = _guarded(lambda: peak_memory(fns[name], inputs[0], device), batch, failed_at, name,
                              device)
            median = percentile(outcome, 50)
            records[name].update(
                status="ok", repeats=len(outcome), median_ms=median * 1e3, p50_ms=median * 1e3,
                p90_ms=percentile(outcome, 90) * 1e3, p99_ms=percentile(outcome, 99) * 1e3,
                images_per_s=batch / median,
                peak_memory_mb=memory / 2 ** 20 if isinstance(memory, int) else None)
        results["records"] += list(records.values())
        bar.update(len(impls))
    _add_ratios(results["records"], config, profile)


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
        return {"status": "oom", "reason": f"out of memory at batch {batch}"}
    return {"status": "failed", "reason": f"{type(error).__name__}: {_first_line(error)}"}


def _add_ratios(records, config, profile):
    """Speed-up over DeiT dense and over the gated reference, same config, profile and batch."""
    mine = [r for r in records if r["profile"] == profile and r["scale"] == config["scale"]
            and r["dtype"] == config["dtype"] and r["img_size"] == config["img_size"]]
    by_key = {(r["implementation"], r["batch"]): r for r in mine}
    for record in mine:
        if record["status"] != "ok":
            continue
        record["tflops"] = record["flops_per_image"] * record["images_per_s"] / 1e12
        for name, label in (("deit-dense", "speedup_vs_deit"), ("reference", "speedup_vs_reference")):
            base = by_key.get((name, record["batch"]))
            record[label] = (base["median_ms"] / record["median_ms"]
                             if base and base["status"] == "ok" else None)


# ----------------------------------------------------------------------------------------------
# Reports


def _ok(records, **where):
    return [r for r in records if r["status"] == "ok" and all(r[k] == v for k, v in where.items())]


def _fmt(value, digits=2):
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def headline_table(results: dict, config: Optional[dict] = None, profile: Optional[str] = None) -> str:
    """The README's headline table (Markdown) for one config and profile of a results dict:
    one row per implementation, throughput at the largest batch, latency at batch 1 and 8,
    speed-ups over DeiT dense and over the gated reference. Unavailable ones are listed with why."""
    config = config or results["configs"][0]
    profile = profile or results["settings"]["headline_profile"]
    where = {k: config[k] for k in ("scale", "dtype", "img_size")}
    records = [r for r in results["records"] if r["profile"] == profile
               and all(r[k] == v for k, v in where.items())]
    batches = sorted({r["batch"] for r in records})
    big = max(batches)
    lat = [b for b in results["settings"]["latency_batches"] if b in batches]
    head = (["implementation", f"img/s @ b={big}"] + [f"p50 ms @ b={b}" for b in lat]
            + [f"vs DeiT @ b={b}" for b in (lat[:1] + [big])] + [f"vs reference @ b={big}", f"TFLOP/s @ b={big}"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for name in results["implementations"]:
        mine = {r["batch"]: r for r in records if r["implementation"] == name}
        at_big = mine.get(big)
        if not any(r["status"] == "ok" for r in mine.values()):
            reason = next((r.get("reason") for r in mine.values() if r.get("reason")), "not run")
            notes.append(f"- **{name}**: not measured: {reason}")
            continue
        def get(batch, key, digits=2):
            record = mine.get(batch)
            return _fmt(record.get(key), digits) if record and record["status"] == "ok" else \
                (record["status"] if record else "n/a")
        cells = [name, get(big, "images_per_s", 1)] + [get(b, "p50_ms") for b in lat] + \
            [get(b, "speedup_vs_deit") + ("x" if get(b, "speedup_vs_deit")[0].isdigit() else "")
             for b in lat[:1] + [big]] + \
            [get(big, "speedup_vs_reference") + ("x" if get(big, "speedup_vs_reference")[0].isdigit() else ""),
             get(big, "tflops", 4)]
        rows.append("| " + " | ".join(cells) + " |")
    dev = results["device"]
    sums = next((r for r in records if r["implementation"] == "reference"), records[0] if records else {})
    caption = (f"{dev['name']}, Edge-RecViT-{config['scale'].capitalize()} vs DeiT-"
               f"{config['scale'].capitalize()}, {config['dtype']}, {config['img_size']}px "
               f"({config['tokens']} tokens), depth profile '{profile}' (realised sum alpha = "
               f"{sums.get('sum_alpha', 'n/a')}, sum alpha^2 = {sums.get('sum_alpha_sq', 'n/a')}); "
               f"torch {dev['torch']}, commit {dev['git_commit'][:10]}.")
    return "\n".join([caption, ""] + rows + ([""] + notes if notes else []))


def markdown_report(results: dict) -> str:
    """Full Markdown report: environment, the paper profile, and one table per config and profile."""
    dev = results["device"]
    lines = ["# recvit benchmark results", "",
             f"Device: **{dev['name']}** ({dev['device_type']}), driver {dev.get('driver')}, "
             f"torch {dev['torch']}, CUDA {dev['cuda']}, triton {dev['triton']}, "
             f"commit `{dev['git_commit']}`{' (dirty tree)' if dev.get('git_dirty') else ''}, "
             f"{dev['date_utc']}, {dev['torch_threads']} torch threads.", "",
             "Generated by `python -m benchmarks.run`; do not edit by hand. Ratios compare "
             "implementations of one run only. Times are medians of per-call times after warm-up, "
             "inputs rotated among several batches. Peak memory is torch's allocator peak on a GPU "
             "and not measured on the CPU (n/a). TFLOP/s counts the active FLOPs (supplement "
             "conventions, recvit.flops) of each implementation's own work: Edge-RecViT's for every "
             "Edge-RecViT implementation, the dense model's for DeiT.", "",
             f"Paper depth profile (ours; the paper gives only its sums): active tokens of a 197-token "
             f"image at steps 1..12 = {list(results['paper_profile']['active_tokens_224'])}, "
             f"sum alpha = {results['paper_profile']['sum_alpha']}, sum alpha^2 = "
             f"{results['paper_profile']['sum_alpha_sq']}. At other token counts N_l = round(alpha_l N0).",
             "", "## Implementations", ""]
    lines += [f"- **{name}**: {text}" for name, text in results["implementations"].items()]
    for config in results["configs"]:
        for profile in results["settings"]["profiles"]:
            lines += ["", f"## {config['scale']} / {config['dtype']} / {config['img_size']}px / "
                      f"profile {profile}", "", headline_table(results, config, profile), "",
                      "| implementation | batch | img/s | p50 ms | p90 ms | p99 ms | peak MiB | "
                      "TFLOP/s | vs DeiT | vs reference |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in results["records"]:
                if r["profile"] != profile or any(r[k] != config[k] for k in ("scale", "dtype", "img_size")):
                    continue
                if r["status"] != "ok":
                    continue
                lines.append(f"| {r['implementation']} | {r['batch']} | {_fmt(r['images_per_s'], 1)} | "
                             f"{_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | {_fmt(r['p99_ms'])} | "
                             f"{_fmt(r['peak_memory_mb'], 0)} | {_fmt(r.get('tflops'), 4)} | "
                             f"{_fmt(r.get('speedup_vs_deit'))} | {_fmt(r.get('speedup_vs_reference'))} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path) -> list[Path]:
    """throughput.png, latency.png, speedup.png for the first config and the headline profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, profile = results["configs"][0], results["settings"]["headline_profile"]
    where = {k: config[k] for k in ("scale", "dtype", "img_size")}
    records = _ok(results["records"], profile=profile, **where)
    names = [n for n in results["implementations"] if any(r["implementation"] == n for r in records)]
    title = (f"{results['device']['name']}: {config['scale']} {config['dtype']} {config['img_size']}px, "
             f"profile '{profile}'")
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        mine = sorted((r["batch"], r["images_per_s"]) for r in records if r["implementation"] == name)
        ax.plot(*zip(*mine), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title=title)
    ax.set_xticks(sorted({r["batch"] for r in records}), labels=sorted({r["batch"] for r in records}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "throughput.png"))

    lat = [b for b in results["settings"]["latency_batches"] if any(r["batch"] == b for r in records)]
    fig, axes = plt.subplots(1, len(lat), figsize=(5 * len(lat), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], lat):
        rows = [next(r for r in records if r["implementation"] == n and r["batch"] == batch)
                for n in names if any(r["implementation"] == n and r["batch"] == batch for r in records)]
        labels = [r["implementation"] for r in rows]
        p50 = [r["p50_ms"] for r in rows]
        err = [[0] * len(rows), [r["p99_ms"] - r["p50_ms"] for r in rows]]
        ax.barh(labels, p50, xerr=err, capsize=3)
        ax.invert_yaxis()
        ax.set(xlabel="latency ms (bar p50, whisker p99)", title=f"batch {batch}")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title)
    paths.append(_save(fig, out_dir / "latency.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        mine = sorted((r["batch"], r["speedup_vs_deit"]) for r in records
                      if r["implementation"] == name and r.get("speedup_vs_deit"))
        if mine:
            ax.plot(*zip(*mine), marker="o", label=name)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set(xscale="log", xlabel="batch size", ylabel="speed-up over DeiT dense (x)", title=title)
    ax.set_xticks(sorted({r["batch"] for r in records}), labels=sorted({r["batch"] for r in records}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "speedup.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_results(results: dict, out_root: Path, plots: bool = True) -> Path:
    """Write results.json, results.md (and PNGs) to ``out_root/<device slug>/``; returns the folder."""
    folder = Path(out_root) / device_slug(results["device"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "results.md").write_text(markdown_report(results))
    if plots:
        plot(results, folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recvit bench",
        description="Time Edge-RecViT implementations against a dense DeiT on the present device. "
                    "Default: a quick side-by-side of the model backends. --full: the whole harness "
                    "(all implementations, depth profiles, batch sizes), written to --out.")
    parser.add_argument("--full", action="store_true", help="run the whole harness and write results")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even where a GPU is present")
    parser.add_argument("--out", type=Path, default=None,
                        help="results root (default benchmarks/results with --full; quick mode writes "
                             "nothing unless given)")
    parser.add_argument("--scales", nargs="+", choices=sorted(SCALES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--img-sizes", nargs="+", type=int)
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--profiles", nargs="+", choices=PROFILES)
    parser.add_argument("--implementations", nargs="+", metavar="NAME",
                        help=f"subset of: {', '.join(i.name for i in implementations())}")
    parser.add_argument("--compile", action="store_true", help="time torch.compile on the CPU too")
    parser.add_argument("--target-s", type=float,
                        help="seconds of timed calls per implementation and measurement")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    settings = default_settings(device, full=args.full)
    for name in ("scales", "dtypes", "img_sizes", "batch_sizes", "profiles", "implementations"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, list(value))
    if args.batch_sizes is not None:
        settings.profile_batch_sizes = [b for b in settings.profile_batch_sizes if b in args.batch_sizes] \
            or list(args.batch_sizes)
        settings.latency_batches = [b for b in settings.latency_batches if b in args.batch_sizes]
    if args.profiles is not None:
        settings.headline_profile = args.profiles[0]
    if args.target_s is not None:
        settings.target_s = args.target_s
    settings.force_compile = args.compile
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a positive integer, got {args.threads}")
        settings.threads = args.threads
    if device == "cpu" and any(d != "fp32" for d in settings.dtypes):
        raise SystemExit(f"--dtypes: the CPU mode times fp32 only, got {settings.dtypes}")
    for size in settings.img_sizes:
        if size % 16:
            raise SystemExit(f"--img-sizes: {size} is not a multiple of the patch size 16")
    if any(b < 1 for b in settings.batch_sizes):
        raise SystemExit(f"--batch-sizes: expected positive integers, got {settings.batch_sizes}")
    return settings


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    settings = settings_from_args(args)
    results = run(settings, progress=not args.no_progress)
    out = args.out if args.out is not None else (Path("benchmarks/results") if args.full else None)
    if out is not None:
        folder = write_results(results, out, plots=not args.no_plots)
        print(f"wrote {folder}/results.json, results.md" + ("" if args.no_plots else " and PNG plots"))
    print()
    print(headline_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
