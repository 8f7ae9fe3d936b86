"""CUDA-graph capture of a whole Edge-RecViT (or early-exit DeiT) forward (ranker to classifier) on
the triton backend.

``compile_graph(model, example_images, depths=None)`` runs the model's sync-free path
(``DepthSteps.static_shapes``: every step on all B*N rows, M_l kept on the device), warms it up
on a side stream, captures one inference forward (``torch.no_grad``) into a ``torch.cuda.CUDAGraph``
and returns a :class:`GraphedForward`. Calling it copies the new images (and depths) into the static
input buffers, replays the graph and returns a copy of the logits. Inputs must match the example's
shape, dtype and device: anything else raises ``ValueError``, since a replay would silently reuse
the captured shapes. :func:`capture` is the warm-up and capture step alone, for any forward that reads
static input buffers (the benchmark's dense baselines use it).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn


class GraphedForward:
    """A captured forward: ``graphed(images, depths=None) -> logits`` (a fresh tensor per call)."""

    def __init__(self, graph: Optional["torch.cuda.CUDAGraph"], static_images: torch.Tensor,
                 static_depths: Optional[torch.Tensor], static_logits: Optional[torch.Tensor]):
        self.graph = graph
        self.static_images, self.static_depths = static_images, static_depths
        self.static_logits = static_logits

    def check_inputs(self, images: torch.Tensor, depths: Optional[torch.Tensor] = None) -> None:
        """Raise ``ValueError`` naming the argument unless the inputs match the captured ones."""
        _check_like("images", images, self.static_images)
        if (depths is None) != (self.static_depths is None):
            captured = "without" if self.static_depths is None else "with"
            raise ValueError(f"depths: the graph was captured {captured} a depth override; pass "
                             f"{'none' if self.static_depths is None else 'one'}")
        if depths is not None:
            _check_like("depths", depths, self.static_depths)

    def __call__(self, images: torch.Tensor, depths: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_inputs(images, depths)
        self.static_images.copy_(images)
        if depths is not None:
            self.static_depths.copy_(depths)
        self.graph.replay()
        return self.static_logits.clone()


def _check_like(name: str, given, captured: torch.Tensor) -> None:
    if not isinstance(given, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(given).__name__}")
    for what, have, want in (("shape", tuple(given.shape), tuple(captured.shape)),
                             ("dtype", given.dtype, captured.dtype),
                             ("device", given.device, captured.device)):
        if have != want:
            raise ValueError(f"{name}: the graph was captured for {what} {want}, got {have}; "
                             f"call compile_graph again for new inputs")


def compile_graph(model: nn.Module, example_images: torch.Tensor, depths: Optional[torch.Tensor] = None,
                  *, backend: str = "triton", warmup: int = 3) -> GraphedForward:
    """Capture ``model(images, depths, backend=backend)`` (inference) in a CUDA graph.

    ``model`` is an Edge-RecViT-style module with a ``recursion`` (:class:`~recvit.RecursiveBlock`,
    or an early-exit DeiT's :class:`~recvit.DepthAdaptiveBlocks`); its ``static_shapes`` flag is set
    for the warm-up and the capture and restored afterwards.
    """
    if not isinstance(example_images, torch.Tensor):
        raise TypeError(f"example_images: expected a torch.Tensor, got {type(example_images).__name__}")
    if example_images.device.type != "cuda":
        raise ValueError("example_images: CUDA graphs need a CUDA tensor, got device "
                         f"{example_images.device}")
    if depths is not None and (not isinstance(depths, torch.Tensor)
                               or depths.device != example_images.device):
        raise ValueError(f"depths: expected a tensor on {example_images.device}")
    recursion = getattr(model, "recursion", None)
    if recursion is None or not hasattr(recursion, "static_shapes"):
        raise TypeError("model: expected a model with a `recursion` (e.g. EdgeRecViT, EarlyExitViT)")
    static_images = example_images.clone()
    static_depths = None if depths is None else depths.clone()
    previous = recursion.static_shapes
    recursion.static_shapes = True
    try:
        graph, static_logits = capture(lambda: model(static_images, static_depths, backend=backend),
                                       example_images.device, warmup)
    finally:
        recursion.static_shapes = previous
    return GraphedForward(graph, static_images, static_depths, static_logits)


def capture(forward: Callable[[], torch.Tensor], device: torch.device,
            warmup: int = 3) -> tuple["torch.cuda.CUDAGraph", torch.Tensor]:
    """``(graph, output)``: ``forward()`` (inference, reading static input buffers) run ``warmup``
    times on a side stream, then captured once in a CUDA graph whose replay rewrites ``output``."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        output = forward()
    return graph, output
