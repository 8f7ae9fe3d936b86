"""The registry of implementations the harness times: each is ``fn(images, depths) -> logits``,
built per model by :class:`Implementation`'s ``build``, or :class:`Unavailable` with the reason.

Report order: the baselines a user has (DeiT dense, eager and in a CUDA graph; ToMe at Edge-RecViT's
FLOPs), Edge-RecViT as the public code runs it, the per-step ways to write it by hand, then ours, then
the early-exit DeiT (the same DeiT's 12 distinct blocks with per-token depth, :func:`recvit.from_vit`)
on the same depths: it does the same FLOPs as Edge-RecViT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import recvit_kernels as rk

from ..models.early_exit import from_vit
from ..flops import count_flops
from .baselines import (DeiTDense, Unavailable, capture_graph, dense_flops, gather_scatter_step,
                        nested_attend, packed_step, probe, recvit_forward, varlen_attn_attend)
from .profiles import profile_depths
from .tome import ToMe, choose_r, tome_flops


@dataclass
class Implementation:
    name: str
    description: str
    # build(model, deit, example_images, example_depths) -> fn(images, depths) or raise Unavailable
    build: Callable
    # flops(model, deit) -> FLOPs per image of a model whose work does not follow the depths;
    # None: Edge-RecViT's active FLOPs for the depths timed
    flops: Optional[Callable] = None
    headline_only: bool = False  # timed for the headline depth profile only (slow to build)


def paper_profile_flops(model) -> float:
    """Edge-RecViT's FLOPs per image with the paper's depth profile at the model's token count
    (24.39 GFLOPs for Base at 224 px): the budget ToMe's r is chosen for."""
    depths = profile_depths("paper", 1, model.num_tokens, model.num_steps, torch.Generator().manual_seed(0))
    return count_flops(model, depths).total


def tome_r(model, deit: DeiTDense) -> int:
    """ToMe's tokens merged per layer: FLOPs closest to Edge-RecViT's with the paper profile."""
    return choose_r(deit, paper_profile_flops(model))


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
        if images.device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA GPU")
        from ..models.graph import compile_graph

        return compile_graph(model, images, depths=depths, backend=backend)
    return build


def _early_exit_impl(backend: str, graph: bool):
    """The DeiT's blocks with per-token early exit on ``backend`` (optionally one CUDA graph)."""
    def build(model, deit, images, depths):
        _backend_impl(backend)(model, deit, images, depths)
        if depths is None:
            raise Unavailable("timed on fixed depth profiles: its own (untrained) ranker would pick other "
                              "depths than the FLOPs recorded for Edge-RecViT's ranker")
        early_exit = from_vit(deit)
        if not graph:
            return lambda x, d: early_exit(x, depths=d, backend=backend)
        _graph_impl(backend)(model, deit, images, depths)  # refuses without a GPU
        from ..models.graph import compile_graph

        return compile_graph(early_exit, images, depths=depths, backend=backend)
    return build


def _dense_impl(graph: bool):
    def build(model, deit, images, depths):
        return capture_graph(deit, images) if graph else (lambda x, d: deit(x))
    return build


def _tome_impl(graph: bool):
    def build(model, deit, images, depths):
        tome = ToMe(deit, tome_r(model, deit))
        return capture_graph(tome, images) if graph else (lambda x, d: tome(x))
    return build


def _with_probe(attend_factory, needs_import: Optional[str] = None):
    def build(model, deit, images, depths):
        if needs_import:
            try:
                __import__(needs_import)
            except ImportError as error:
                raise Unavailable(f"{needs_import} is not in torch {torch.__version__}: {error}") from None
        reason = probe(attend_factory, images.device, images.dtype)
        if reason is not None:
            raise Unavailable(f"not supported on {images.device.type} / {images.dtype}: {reason}")
        step = packed_step(attend_factory)
        return lambda x, d: recvit_forward(model, x, d, step)
    return build


def _compile_impl(target: str, force: bool):
    def build(model, deit, images, depths):
        if images.device.type != "cuda" and not force:
            raise Unavailable("torch.compile is skipped on the CPU (minutes to compile per shape); "
                              "pass --compile to force it")
        torch._dynamo.reset()  # a fresh cache per build: never hit the recompile limit (silent eager)
        if target == "dense":
            compiled = torch.compile(deit)
            return lambda x, d: compiled(x)
        return torch.compile(lambda x, d: model(x, depths=d, backend=target))
    return build


def _tome_flops(model, deit):
    return tome_flops(deit, tome_r(model, deit))


def implementations(force_compile: bool = False) -> list[Implementation]:
    """Every implementation the harness knows, in report order (DeiT dense first: the baseline)."""
    dense = lambda model, deit: dense_flops(deit)  # noqa: E731
    impls = [
        Implementation("deit-dense", "DeiT of the same scale, 12 dense layers, SDPA", _dense_impl(False),
                       flops=dense),
        Implementation("deit-dense+graph", "the same DeiT captured in one CUDA graph (batch-1 latency "
                       "compares graphs on both sides)", _dense_impl(True), flops=dense),
        Implementation("tome", "ToMe (Bolya et al. 2023) on the same DeiT weights: bipartite soft "
                       "matching merges r tokens per layer, proportional attention; r chosen so its "
                       "FLOPs match Edge-RecViT's with the paper profile (r and FLOPs in the caption)",
                       _tome_impl(False), flops=_tome_flops),
        Implementation("tome+graph", "ToMe captured in one CUDA graph", _tome_impl(True), flops=_tome_flops),
        Implementation("reference", "Edge-RecViT as the public code runs it: every token through all "
                       "steps, updates gated (backend='eager')", _backend_impl("eager")),
        Implementation("gather-scatter", "eager per step: gather each image's active tokens into a "
                       "padded batch, run the layer, index_copy back",
                       lambda model, deit, images, depths: (
                           lambda x, d: recvit_forward(model, x, d, gather_scatter_step))),
        Implementation("nested-sdpa", "per step: index_select active tokens, nested jagged tensors "
                       "(torch.jagged) + SDPA, index_copy back", _with_probe(nested_attend)),
        Implementation("varlen_attn", "per step: index_select active tokens, "
                       "torch.nn.attention.varlen.varlen_attn, index_copy back",
                       _with_probe(varlen_attn_attend, "torch.nn.attention.varlen")),
    ]
    for backend in ("packed", "triton", "cuda"):
        impls.append(Implementation(backend, f"ours: depth-sorted prefix layout, backend='{backend}'",
                                    _backend_impl(backend)))
        impls.append(Implementation(f"{backend}+graph", f"ours: backend='{backend}', whole forward "
                                    "captured in one CUDA graph (recvit.models.graph)", _graph_impl(backend)))
    impls.append(Implementation("early-exit-reference", "early-exit DeiT masked: every token through all "
                                "12 blocks, updates gated (backend='eager')", _early_exit_impl("eager", False)))
    for backend in ("packed", "triton", "cuda"):
        impls.append(Implementation(f"early-exit-{backend}", "early-exit DeiT (recvit.from_vit, the DeiT's 12 "
                                    f"distinct blocks) on the depth-sorted prefix layout, backend='{backend}'",
                                    _early_exit_impl(backend, False)))
    for backend in ("triton", "cuda"):
        impls.append(Implementation(f"early-exit-{backend}+graph", f"early-exit DeiT, backend='{backend}', "
                                    "whole forward captured in one CUDA graph", _early_exit_impl(backend, True)))
    impls += [
        Implementation("deit-dense+compile", "DeiT dense through torch.compile",
                       _compile_impl("dense", force_compile), flops=dense, headline_only=True),
        Implementation("reference+compile", "the gated reference through torch.compile",
                       _compile_impl("eager", force_compile), headline_only=True),
        Implementation("packed+compile", "ours (packed) through torch.compile, in one graph: the "
                       "sync-free path, whose token-wise layers compute every row on packed",
                       _compile_impl("packed", force_compile), headline_only=True),
    ]
    return impls


IMPLEMENTATION_NAMES = tuple(impl.name for impl in implementations())
