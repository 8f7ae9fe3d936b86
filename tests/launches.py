"""Count the kernels a forward launches and the bytes they write, traced on CPU tensors.

What counts as a launch (``LaunchTrace``):
- an aten op seen by a ``TorchDispatchMode`` (below autograd, so ``F.linear`` shows up as the
  ``addmm``/``mm`` that runs) launches one kernel on a GPU, except
  - views (an output aliases an input without writing it: ``view``, ``t``, ``slice``, ``unbind``,
    ``transpose``, ``expand``, ...): they only make a new tensor header;
  - allocations (``empty``, ``empty_like``, ``empty_strided``, ``new_empty``): the caching
    allocator, no kernel;
  - ``_local_scalar_dense`` (``.item()``/``.tolist()``): no kernel, but a host sync; counted
    apart in ``syncs``.
  An op that launches several kernels on a GPU (a sort, SDPA's flash kernel with its setup) is
  counted once: the counts are a lower bound for both sides alike. A ``recvit::`` custom op (the
  kernel backends' launches, opaque to ``torch.compile``) is not an op of its own: what it runs
  inside is counted.
- a Triton kernel launch (``kernel[grid](...)``) is one launch; the fake launcher records it
  instead of running it (``execute=False``) or runs it in the interpreter (``execute=True``).

Bytes written: an out-of-place aten op writes its outputs (``nbytes``), an in-place or ``out=``
op the tensors it mutates; a Triton kernel writes what its ``tl.store`` calls store under their
masks (counted in the interpreter, so only with ``execute=True``).

GEMM FLOPs: 2 m n k per product, for the aten ``mm``/``addmm``/``bmm``/``baddbmm`` from their
shapes, and for a Triton kernel over the ``tl.dot`` tiles it issues (in the interpreter, masked
rows of a tile included, as a GPU computes them too). Fused aten attention (SDPA) is not counted.

Run ``PYTHONPATH=$PWD python tests/launches.py [1x224 256x32 ...]`` (batch x image size) for the
launch counts of Edge-RecViT-Base and the early-exit DeiT-B (static and packed paths, both kv modes)
and of the dense DeiT-B baseline of ``recvit.bench``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import recvit
import recvit_kernels as rk

from recvit.bench import DeiTDense  # the dense baseline; the one place it is imported

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
VIEWS_WITHOUT_ALIAS_INFO = {"_unsafe_view"}  # a view whose schema does not say so


@dataclass
class Launch:
    kind: str  # "aten" or "triton"
    name: str
    bytes_written: int = 0
    gemm_flops: int = 0


@dataclass
class LaunchTrace:
    launches: list = field(default_factory=list)
    syncs: int = 0
    running: list = field(default_factory=list)  # the Triton launch being interpreted, if any

    def count(self, kind=None) -> int:
        return sum(1 for launch in self.launches if kind is None or launch.kind == kind)

    def bytes_written(self) -> int:
        return sum(launch.bytes_written for launch in self.launches)


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


def _gemm_flops(name, args) -> int:
    if name not in GEMMS:
        return 0
    a, b = args[-2:] if name in ("addmm", "baddbmm") else args[:2]
    return 2 * a.numel() * b.shape[-1]


def _written(func, args, kwargs, out) -> int:
    mutated = [a for a, arg in zip(args, func._schema.arguments)
               if arg.alias_info is not None and arg.alias_info.is_write and isinstance(a, torch.Tensor)]
    mutated += [v for name, v in kwargs.items() if isinstance(v, torch.Tensor) and any(
        arg.name == name and arg.alias_info is not None and arg.alias_info.is_write
        for arg in func._schema.arguments)]
    if mutated:
        return sum(t.nbytes for t in mutated)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(t.nbytes for t in outs if isinstance(t, torch.Tensor))


class _AtenCounter(TorchDispatchMode):
    def __init__(self, trace: LaunchTrace):
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "recvit":  # a kernel backend's custom op: count what it runs inside
            with self:
                return func.redispatch(_backend_keys(args), *args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.trace.running:  # the interpreter's own copies of a Triton launch's arguments
            return out
        if name == "_local_scalar_dense":
            self.trace.syncs += 1
        elif name not in ALLOCATIONS | VIEWS_WITHOUT_ALIAS_INFO and not _is_view(func):
            self.trace.launches.append(Launch("aten", name, _written(func, args, kwargs, out),
                                              _gemm_flops(name, args)))
        return out


def _backend_keys(args) -> torch._C.DispatchKeySet:
    """The dispatch key of the tensors' device, to run a custom op's implementation below the mode."""
    device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if device.type == "cuda"
                                   else torch._C.DispatchKey.CPU)


def _triton_kernels():
    import recvit_kernels.triton as backend

    kernels = []
    for module in vars(backend).values():
        if getattr(module, "__name__", "").startswith("recvit_kernels.triton."):
            for value in vars(module).values():
                if hasattr(value, "run") and hasattr(value, "fn") and value not in kernels:
                    kernels.append(value)
    return kernels


@contextlib.contextmanager
def trace_launches(execute: bool = False):
    """Yield a :class:`LaunchTrace` filled by everything run inside the block.

    ``execute=False`` records each Triton launch without running it (its output keeps whatever
    the allocation held); ``execute=True`` runs it in the interpreter and counts its stores.
    Value checks that read device memory back (``RECVIT_CHECK_VALUES``) are off inside, as on a GPU.
    """
    from triton.runtime.interpreter import InterpreterBuilder

    trace = LaunchTrace()
    current = trace.running
    saved_env = os.environ.get("RECVIT_CHECK_VALUES")
    os.environ["RECVIT_CHECK_VALUES"] = "0"
    patched = []
    for kernel in _triton_kernels():
        original = kernel.run

        def run(*args, _kernel=kernel, _original=original, **kwargs):
            launch = Launch("triton", _kernel.fn.__name__)
            trace.launches.append(launch)
            if execute:
                current.append(launch)
                try:
                    return _original(*args, **kwargs)
                finally:
                    current.pop()
            return None

        kernel.run = run
        patched.append(kernel)
    original_store = InterpreterBuilder.create_masked_store

    def store(builder, ptrs, value, mask, *rest):  # rest: cache/eviction policies (per Triton version)
        if current:
            current[-1].bytes_written += int(np.count_nonzero(mask.data)) * value.data.dtype.itemsize
        return original_store(builder, ptrs, value, mask, *rest)

    InterpreterBuilder.create_masked_store = store
    original_dot = InterpreterBuilder.create_dot

    def dot(builder, a, b, *rest):
        if current:
            current[-1].gemm_flops += 2 * a.data.size * b.data.shape[-1]
        return original_dot(builder, a, b, *rest)

    InterpreterBuilder.create_dot = dot
    original_tolist = torch.Tensor.tolist

    def tolist(tensor):  # reads device memory without an aten op
        trace.syncs += 1
        return original_tolist(tensor)

    torch.Tensor.tolist = tolist
    try:
        with _AtenCounter(trace):
            yield trace
    finally:
        torch.Tensor.tolist = original_tolist
        InterpreterBuilder.create_masked_store = original_store
        InterpreterBuilder.create_dot = original_dot
        for kernel in patched:
            del kernel.run
        if saved_env is None:
            os.environ.pop("RECVIT_CHECK_VALUES", None)
        else:
            os.environ["RECVIT_CHECK_VALUES"] = saved_env


def base_models(dtype=torch.float16, img_size: int = 224):
    """Edge-RecViT-Base and the dense DeiT-B, eval mode, in ``dtype`` on the CPU.

    Fp16 stands in for bf16 (the same casts; the interpreter refuses bf16). The modules are built
    on the meta device and their weights drawn from a normal distribution, which is fast: weight
    values do not change a launch (the ranker's depths may change, but the sync-free path reads
    none of them on the host, and the packed path runs every step while [CLS] is active).
    """
    with torch.device("meta"):
        models = (recvit.create_model("edge_recvit_base", img_size=img_size), DeiTDense(img_size))
    with torch.no_grad():
        for model in models:
            model.to_empty(device="cpu")
            for parameter in model.parameters():
                parameter.normal_(0, 0.02)
    return tuple(model.eval().to(dtype) for model in models)


def count_forward(model, images, **kwargs) -> LaunchTrace:
    """The launches of one inference forward ``model(images, **kwargs)`` (Triton kernels faked)."""
    with torch.no_grad(), trace_launches() as trace:
        model(images, **kwargs)
    return trace


def step_backward(layer, rows, layout, step: int, kv: str = "active", backend: str = "triton") -> LaunchTrace:
    """The launches of one static-path recursion step's backward, run (Triton in the interpreter).

    As ``RecursiveBlock._steps_static`` trains: ``layer.forward_static`` on ``rows`` (B*N, C) (a
    fresh leaf), merged with ``torch.where(position < M_l, updated, rows)``; the forward is not
    traced, the backward of the merged rows for a random gradient is. The layer's parameter
    gradients are reset first.
    """
    layer.zero_grad(set_to_none=True)
    rows = rows.detach().requires_grad_()
    updated = layer.forward_static(rows, layout, step, kv, backend)
    position = torch.arange(rows.shape[0], device=rows.device)[:, None]
    merged = torch.where(position < layout.step_rows[step - 1], updated, rows)
    grad = torch.randn_like(merged)
    with trace_launches(execute=True) as trace:
        merged.backward(grad)
    return trace


def launch_counts(batch: int = 1, img_size: int = 224, dtype=torch.float16) -> dict:
    """{name: LaunchTrace} for the dense DeiT-B, Edge-RecViT-Base and the early-exit DeiT-B
    (``recvit.from_vit`` of that DeiT, names prefixed ``early-exit``) on the triton backend."""
    model, deit = base_models(dtype, img_size)
    images = torch.randn(batch, 3, img_size, img_size, dtype=dtype)
    traces = {"dense DeiT-B": count_forward(deit, images)}
    for prefix, dynamic in (("", model), ("early-exit ", recvit.from_vit(deit))):
        for static in (True, False):
            dynamic.recursion.static_shapes = static
            for kv in ("active", "all"):
                name = f"{prefix}{'static' if static else 'packed'} kv={kv}"
                traces[name] = count_forward(dynamic, images, kv=kv, backend="triton")
        dynamic.recursion.static_shapes = False
    return traces


def main(argv) -> int:
    """``launches.py [BATCH[xIMG_SIZE]] ...``, e.g. ``1x224 256x32`` (default ``1x224``)."""
    for spec in argv or ["1x224"]:
        batch, _, img_size = spec.partition("x")
        batch, img_size = int(batch), int(img_size or 224)
        traces = launch_counts(batch, img_size)
        dense = traces["dense DeiT-B"].count()
        print(f"batch {batch}, {img_size} px: launches per forward (aten + triton), host syncs, "
              f"ratio to dense")
        for name, trace in traces.items():
            print(f"  {name:29s} {trace.count():4d} = {trace.count('aten'):3d} + "
                  f"{trace.count('triton'):3d}  syncs {trace.syncs}  x{trace.count() / dense:.2f}")
    return 0


if __name__ == "__main__":
    rk.unavailable_reason("triton")  # load the backends before tracing
    sys.exit(main(sys.argv[1:]))
