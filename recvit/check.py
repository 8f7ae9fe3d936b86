"""``recvit check``: does this package compute the right thing on this machine?

For every backend available on the device: each op (depth_sort, pack/unpack, varlen_attention,
layer_norm with and without the fused residual, mlp, prefix_linear) against the eager op, in the
forms the model calls too (attention over one ``image_order`` table with ``seqused_q/k``, LayerNorm
on the live rows ``num_rows``, prefix_linear writing into ``out=`` in place), then the
Edge-RecViT forward of each backend against the eager (masked) forward, on the prefix path and on
the sync-free path (``RecursiveBlock.static_shapes``); on CUDA that sync-free forward runs under
``torch.cuda.set_sync_debug_mode("error")``, and a CUDA-graph capture is replayed on new images.
Last, per backend and kv mode, a batch whose image 0 holds a NaN pixel: the other images' logits
must equal a clean run's (within the model floor). A non-finite input is not checked for (that
would read values back, a host sync): it propagates within its own image, as in flash-attention
and timm, and never reaches the others. A call that a backend hands on (``HANDS_ON``: the cuda
kernels decline fp32 attention and inputs that require grad) is noted on its row: an op row is
then a skip, a model row says which ops ran elsewhere.
Floating-point results pass by flash-attention's rule (:mod:`recvit_kernels.tolerance`): the error
against a float64 reference at most twice that of the eager op in the same dtype, plus a floor.
The depth sort and pack/unpack must match exactly: eager's against the definition (sorted by depth,
counts, segments), the other backends' against eager's.

A backend whose op runs another backend's implementation (packed's ops are eager's) is checked
once, under the backend that owns it. On a CPU the
triton backend runs through the Triton interpreter (``TRITON_INTERPRET=1``, set here before the
backend loads) at small sizes, fp32 and fp16 only.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Sequence

# Floors of the tolerance rule, as in the kernel tests: attention, the row-wise ops and GEMMs, the
# whole model (logits after 12 steps).
FLOOR_ATTENTION = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}
FLOOR_ROWS = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
FLOOR_MODEL = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}
MODEL_CHECKS = ("model", "model sync-free", "graph replay", "non-finite input")
CHECKS = ("depth_sort", "pack/unpack", "varlen_attention", "layer_norm", "layer_norm+residual",
          "mlp", "prefix_linear") + MODEL_CHECKS
_DECLINED = re.compile(r"backend='\w+' cannot run this call")
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtypes: torch's names


@dataclass(frozen=True)
class Scale:
    """A model size: Edge-RecViT ``model`` with ``overrides``; its op shapes."""

    name: str
    model: str
    dim: int
    heads: int
    tokens: int
    num_steps: int = 12
    overrides: tuple = ()


TINY = Scale("Tiny", "edge_recvit_tiny", 192, 3, 197)
SMALL = Scale("Small", "edge_recvit_small", 384, 6, 197)
BASE = Scale("Base", "edge_recvit_base", 768, 12, 197)
TINY112 = Scale("Tiny-112px", "edge_recvit_tiny", 192, 3, 50, overrides=(("img_size", 112),))
# The Triton interpreter's sizes: 17 and 50 tokens, 4 steps, head_dim 32 and 64.
MINI = Scale("mini", "edge_recvit_tiny", 64, 2, 17, 4,
             (("img_size", 32), ("patch_size", 8), ("num_classes", 10), ("embed_dim", 64),
              ("num_heads", 2), ("num_steps", 4)))
MINI64 = Scale("mini-hd64", "edge_recvit_tiny", 128, 2, 50, 4,
               (("img_size", 56), ("patch_size", 8), ("num_classes", 10), ("embed_dim", 128),
                ("num_heads", 2), ("num_steps", 4)))


@dataclass(frozen=True)
class Group:
    """Backends checked together at these scales, batch sizes and dtypes."""

    backends: tuple
    scales: tuple
    batches: tuple
    dtypes: tuple


@dataclass
class Result:
    check: str
    backend: str
    dtype: str
    case: str
    status: str                      # "pass", "FAIL" or "skip"
    error: Optional[float] = None    # max |ours - reference|; exact checks: mismatching entries
    bound: Optional[float] = None    # 2 * eager's error + floor; 0 for exact checks
    ms: Optional[float] = None       # one call of the backend (on CUDA after a warm-up call)
    note: str = ""


def plan(device: str, quick: bool, backends: Sequence[str]) -> tuple[list, list]:
    """(op groups, model groups) for the available non-eager ``backends`` on ``device``."""
    import torch

    if device == "cuda":
        scales = (BASE,) if quick else (TINY, SMALL, BASE)
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        on_gpu = tuple(b for b in backends if b in ("triton", "cuda"))
        ops = [Group(("eager",) + on_gpu, scales, (1, 64), dtypes)]
        return ops, [Group(tuple(backends), scales, (1, 64), dtypes)]
    scales = (TINY,) if quick else (TINY, SMALL, BASE)
    batches = (1, 4) if quick else (1, 16)
    ops = [Group(("eager",), scales, batches, (torch.float32,))]
    models = [Group(tuple(b for b in backends if b != "triton"), (TINY112,) if quick else scales, batches,
                    (torch.float32,) if quick else (torch.float32, torch.bfloat16))]
    if "triton" in backends:
        interpreted = Group(("triton",), (MINI,) if quick else (MINI, MINI64), (1, 3),
                            (torch.float32, torch.float16))
        ops.append(interpreted)
        models.append(Group(("triton",), interpreted.scales, (3,) if quick else interpreted.batches,
                            (torch.float32,) if quick else interpreted.dtypes))
    return ops, [group for group in models if group.backends]


def only_dtypes(groups: Sequence[Group], names: Sequence[str]) -> list:
    """``groups`` with their dtypes narrowed to ``names`` (``--dtypes``: fp32, fp16, bf16)."""
    wanted = {DTYPE_NAMES[name] for name in names}
    return [replace(group, dtypes=tuple(d for d in group.dtypes if _dtype_name(d) in wanted))
            for group in groups]


# ----------------------------------------------------------------------------------------------
# Running one check


class _Checker:
    def __init__(self, device: str, only: Optional[Sequence[str]], report: Callable[[Result], None]):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.only = only
        self.report = report
        self.results: list[Result] = []
        self.generator = torch.Generator().manual_seed(0)

    def wanted(self, check: str) -> bool:
        return not self.only or any(part in check for part in self.only)

    def randn(self, *shape, dtype=None, scale: float = 1.0):
        torch = self.torch
        out = torch.randn(*shape, generator=self.generator, dtype=torch.float64) * scale
        return out.to(self.device, dtype or torch.float32)

    def depths(self, batch: int, scale: Scale):
        """Random depths in 1..L, [CLS] (column 0) at L as the model forces it."""
        depths = self.torch.randint(1, scale.num_steps + 1, (batch, scale.tokens), generator=self.generator)
        depths[:, 0] = scale.num_steps
        return depths.to(self.device)

    def timed(self, fn: Callable):
        """(fn(), milliseconds of one call); on CUDA the timed call follows a warm-up call."""
        from .bench.timer import timed_call

        if self.device.type == "cuda":
            fn()
        out, seconds = timed_call(fn, self.device)
        return out, seconds * 1e3

    def run(self, check: str, backend: str, dtype: str, case: str, body: Callable[[], tuple]) -> None:
        """Record ``body() -> (error, bound, ms[, note])`` as a row; a declined call is a skip, an
        exception a failure. An op the backend handed on is noted (an op check is then a skip)."""
        from recvit_kernels._backend import recorded_fallbacks

        try:
            with recorded_fallbacks() as fallbacks:
                error, bound, ms, *note = body()
            status = "pass" if error <= bound else "FAIL"  # NaN fails
            handed_on = _handed_on(fallbacks, backend)
            if handed_on and check not in MODEL_CHECKS:
                status = "skip"
            result = Result(check, backend, dtype, case, status, error, bound, ms,
                            "; ".join(filter(None, [*note, handed_on])))
        except Exception as exc:  # every failure becomes a row of the table
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            declined = isinstance(exc, RuntimeError) and _DECLINED.search(str(exc))
            result = Result(check, backend, dtype, case, "skip" if declined else "FAIL", note=message[:300])
        self.results.append(result)
        self.report(result)

    def rule(self, ours_fn: Callable, theirs, reference, floor: float):
        from recvit_kernels.tolerance import flash_rule

        ours, ms = self.timed(ours_fn)
        ours, theirs, reference = (_flat(t) for t in (ours, theirs, reference))
        rule = flash_rule(ours, theirs, reference, floor)
        return rule.error, rule.bound, ms


def _handed_on(fallbacks, backend: str) -> str:
    """What ``backend`` handed on, from :func:`recvit_kernels._backend.recorded_fallbacks`' list."""
    handed = dict.fromkeys(f"{op} on {taken} ({reason})"
                           for op, skipped, reason, taken in fallbacks if skipped == backend)
    return f"{backend} declined: {', '.join(handed)}" if handed else ""


def _flat(value):
    import torch

    if isinstance(value, tuple):
        return torch.cat([t.reshape(-1) for t in value])
    return value.reshape(-1)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mismatches(a, b) -> int:
    if a.shape != b.shape:
        return max(a.numel(), b.numel())
    return int((a != b).sum())


# ----------------------------------------------------------------------------------------------
# Op checks


def _distinct(op: str, backends: Sequence[str], args, kwargs=None) -> list[str]:
    """The backends in ``backends`` (eager first) whose implementation of ``op`` for these arguments
    is their own, plus those that decline the call or hand it on (reported as skips)."""
    from recvit_kernels._backend import dispatch, recorded_fallbacks

    seen, keep = set(), []
    for backend in backends:
        try:
            with recorded_fallbacks() as fallbacks:
                implementation = dispatch(op, backend, *args, **(kwargs or {}))
        except RuntimeError:
            keep.append(backend)  # declines: the check reports why
            continue
        if _handed_on(fallbacks, backend):
            keep.append(backend)  # hands on: the check reports where
        elif implementation not in seen:
            seen.add(implementation)
            keep.append(backend)
    return keep


def check_ops(checker: _Checker, group: Group) -> None:
    import recvit_kernels as rk

    others = [b for b in group.backends if b != "eager"]
    for scale in group.scales:
        for batch in group.batches:
            depths = checker.depths(batch, scale)
            case = f"{scale.name} b={batch}"
            reference_layout = rk.depth_sort(depths, scale.num_steps, backend="eager")
            sorters = _distinct("depth_sort", ["eager"] + others, (depths, scale.num_steps))
            for backend in [b for b in sorters if b in group.backends]:
                if checker.wanted("depth_sort"):
                    checker.run("depth_sort", backend, "int64", case,
                                lambda: _check_depth_sort(checker, depths, scale, backend, reference_layout))
                if checker.wanted("pack/unpack"):
                    checker.run("pack/unpack", backend, "float32", case,
                                lambda: _check_pack(checker, depths, scale, backend))
            for dtype in group.dtypes:
                _check_row_ops(checker, others, scale, batch, reference_layout, dtype)


def _check_depth_sort(checker, depths, scale, backend, reference):
    import recvit_kernels as rk

    layout, ms = checker.timed(lambda: rk.depth_sort(depths, scale.num_steps, backend=backend))
    if backend == "eager":
        return _definition_mismatches(checker, depths, scale, layout), 0, ms
    fields = ("perm", "inverse_perm", "step_rows", "image_lengths", "cu_seqlens", "image_order")
    return sum(_mismatches(getattr(layout, f), getattr(reference, f)) for f in fields), 0, ms


def _definition_mismatches(checker, depths, scale, layout) -> int:
    """Entries of ``layout`` that break the definition of the depth-sorted layout."""
    torch = checker.torch
    batch, tokens, steps = depths.shape[0], scale.tokens, scale.num_steps
    flat = depths.reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device)
    bad = _mismatches(torch.sort(layout.perm).values, index)
    bad += _mismatches(layout.inverse_perm[layout.perm], index)
    sorted_depths = flat[layout.perm]
    # depth descending, ties in flat-index order
    bad += int((sorted_depths[1:] > sorted_depths[:-1]).sum())
    bad += int(((sorted_depths[1:] == sorted_depths[:-1]) & (layout.perm[1:] < layout.perm[:-1])).sum())
    step = torch.arange(1, steps + 1, device=flat.device)
    active = (depths[None] >= step[:, None, None]).sum(2)  # (L, B)
    bad += _mismatches(layout.step_rows, active.sum(1))
    bad += _mismatches(layout.image_lengths, active.to(torch.int32))
    bad += _mismatches(layout.cu_seqlens, torch.nn.functional.pad(active.cumsum(1), (1, 0)).to(torch.int32))
    # image_order lists image b's rows at positions b*N .. b*N + N - 1, by depth descending
    order_tokens = layout.perm[layout.image_order]
    bad += _mismatches(order_tokens // tokens, index // tokens)
    order_depths = flat[order_tokens].reshape(batch, tokens)
    bad += int((order_depths[:, 1:] > order_depths[:, :-1]).sum())
    return bad


def _check_pack(checker, depths, scale, backend):
    import recvit_kernels as rk

    layout = rk.depth_sort(depths, scale.num_steps, backend=backend)
    x = checker.randn(depths.shape[0], scale.tokens, scale.dim)
    rows, ms = checker.timed(lambda: rk.pack(x, layout))
    bad = _mismatches(rows, x.reshape(-1, scale.dim)[layout.perm])
    bad += _mismatches(rk.unpack(rows, layout), x)
    return bad, 0, ms


def attention_forms(layout, step: int, kv: str) -> dict:
    """The two ways ``varlen_attention`` reads the rows of recursion step ``step`` (1-based) of
    ``layout`` with ``kv`` ("active" or "all"): {form: (cu_seqlens_q, cu_seqlens_k, tables, covered)}
    with ``tables`` the keyword arguments ``q_rows``, ``kv_rows``, ``seqused_q``, ``seqused_k`` and
    ``covered`` the output rows the call specifies (None: all; uncovered rows are zero).

    ``"compact"``: the step's rows as one compact table (``attention_rows`` at the static bound B*N),
    flash-attention's plain varlen form. ``"seqused"``: the model's form
    (``recvit.models.layers.Block._forward_rows``), one ``image_order`` table for every step with the
    static starts b*N and the used lengths ``image_lengths[step - 1]``; its uncovered rows are
    unspecified. Reads M_step back to the host (for ``covered``).
    """
    starts, used = layout.all_rows_cu_seqlens(), layout.image_lengths[step - 1]
    rows, cu = layout.attention_rows(step, layout.batch * layout.tokens), layout.cu_seqlens[step - 1]
    active = kv == "active"
    compact = (cu, cu if active else starts, dict(q_rows=rows, kv_rows=rows if active else layout.image_order))
    seqused = (starts, starts, dict(q_rows=layout.image_order, kv_rows=layout.image_order, seqused_q=used,
                                    seqused_k=used if active else None))
    covered = layout.attention_rows(step, int(layout.step_rows[step - 1]))
    return {"compact": (*compact, None), "seqused": (*seqused, covered)}


def _check_row_ops(checker, candidates, scale, batch, layout, dtype):
    """varlen_attention (both :func:`attention_forms`), layer_norm (+residual; all rows and
    ``num_rows``), mlp, prefix_linear (a new result and ``out=``) at this size and dtype, for the
    ``candidates`` backends with an implementation of their own."""
    import recvit_kernels as rk

    name = _dtype_name(dtype)
    total, dim, heads = batch * scale.tokens, scale.dim, scale.heads

    def against_eager(check, op, args, call, case, floor, tables=None):
        """A row per candidate with its own ``op`` for ``args``: ``call(backend, cast)`` against
        eager's in this dtype and in float64 (``cast`` to double)."""
        backends = _distinct(op, ["eager"] + candidates, args, tables)[1:]
        if not backends:
            return
        reference, theirs = call("eager", lambda t: t.double()), call("eager")
        for backend in backends:
            checker.run(check, backend, name, f"{scale.name} b={batch}{case}",
                        lambda: checker.rule(lambda: call(backend), theirs, reference, floor))

    if checker.wanted("varlen_attention"):
        qkv = checker.randn(total, 3, heads, dim // heads, dtype=dtype)
        q, k, v = qkv.unbind(1)
        for step in (2, scale.num_steps):
            for kv in ("active", "all"):
                for form, (cu_q, cu_k, tables, covered) in attention_forms(layout, step, kv).items():
                    def attention(backend, cast=lambda t: t, cu_q=cu_q, cu_k=cu_k, tables=tables,
                                  covered=covered):
                        out = rk.varlen_attention(*cast(qkv).unbind(1), cu_q, cu_k, scale.tokens, scale.tokens,
                                                  **tables, backend=backend)
                        return out if covered is None else out[covered]

                    against_eager("varlen_attention", "varlen_attention",
                                  (q, k, v, cu_q, cu_k, scale.tokens, scale.tokens, (dim // heads) ** -0.5),
                                  attention, f" step {step} kv={kv}" + ("" if form == "compact" else f" {form}"),
                                  FLOOR_ATTENTION[name], tables)
    x = checker.randn(total, dim, dtype=dtype)
    residual = checker.randn(total, dim, dtype=dtype)
    weight = 1 + checker.randn(dim, dtype=dtype, scale=0.1)
    bias = checker.randn(dim, dtype=dtype, scale=0.1)
    step = 2  # the live rows of the num_rows / prefix_linear forms: M_2
    live = layout.step_rows[step - 1:step]
    num_live = int(live)  # the rows past it are unspecified (the kernels write nothing there)
    for check, res in (("layer_norm", None), ("layer_norm+residual", residual)):
        if not checker.wanted(check):
            continue
        for rows, case in ((None, ""), (live, f" num_rows step {step}")):
            def norm(backend, cast=lambda t: t, res=res, rows=rows):
                out = rk.layer_norm(cast(x), cast(weight), cast(bias), 1e-6,
                                    None if res is None else cast(res), num_rows=rows, backend=backend)
                if rows is None:
                    return out
                return out[:num_live] if res is None else tuple(t[:num_live] for t in out)

            against_eager(check, "layer_norm", (x, weight, bias, 1e-6, res), norm, case, FLOOR_ROWS[name])
    hidden = 4 * dim
    fc1_w = checker.randn(hidden, dim, dtype=dtype, scale=dim ** -0.5)
    fc1_b = checker.randn(hidden, dtype=dtype, scale=0.1)
    fc2_w = checker.randn(dim, hidden, dtype=dtype, scale=hidden ** -0.5)
    fc2_b = checker.randn(dim, dtype=dtype, scale=0.1)
    if checker.wanted("mlp"):
        def run_mlp(backend, cast=lambda t: t):
            return rk.mlp(*(cast(t) for t in (x, fc1_w, fc1_b, fc2_w, fc2_b, residual)), backend=backend)

        against_eager("mlp", "mlp", (x, fc1_w, fc1_b, fc2_w, fc2_b, residual), run_mlp, "", FLOOR_ROWS[name])
    if checker.wanted("prefix_linear"):
        out_residual = checker.randn(total, hidden, dtype=dtype)

        def linear(backend, cast=lambda t: t):
            return rk.prefix_linear(cast(x), cast(fc1_w), cast(fc1_b), live, "gelu", cast(out_residual),
                                    backend=backend)[:num_live]

        def linear_into(backend, cast=lambda t: t):
            """fc2's epilogue in the sync-free forward: the live rows written into ``out`` in place,
            its other rows kept (all rows compared)."""
            out = cast(x).clone()
            rk.prefix_linear(cast(out_residual), cast(fc2_w), cast(fc2_b), live, None, cast(residual), out=out,
                             backend=backend)
            return out

        against_eager("prefix_linear", "prefix_linear", (x, fc1_w, fc1_b, live, "gelu", out_residual), linear,
                      f" gelu+res step {step}", FLOOR_ROWS[name])
        against_eager("prefix_linear", "prefix_linear", (out_residual, fc2_w, fc2_b, live, None, residual),
                      linear_into, f" res out= step {step}", FLOOR_ROWS[name])


# ----------------------------------------------------------------------------------------------
# Model checks


def check_models(checker: _Checker, group: Group) -> None:
    from .models.registry import create_model

    torch = checker.torch
    wanted = [c for c in MODEL_CHECKS if checker.wanted(c)]
    if checker.device.type != "cuda" and "graph replay" in wanted:
        wanted.remove("graph replay")
    if not wanted:
        return
    for scale in group.scales:
        torch.manual_seed(0)
        model = create_model(scale.model, **dict(scale.overrides)).eval().to(checker.device)
        model64 = copy.deepcopy(model).double()
        size = model.patch_embed.img_size
        for batch in group.batches:
            images = checker.randn(batch, 3, size, size)
            depths = checker.depths(batch, scale)
            for dtype in group.dtypes:
                name = _dtype_name(dtype)
                model_d = copy.deepcopy(model).to(dtype)
                low = images.to(dtype)
                for kv in ("active", "all"):
                    case = f"{scale.name} b={batch} kv={kv}"
                    with torch.no_grad():
                        reference = model64(images.double(), depths=depths, kv=kv, backend="eager")
                        theirs = model_d(low, depths=depths, kv=kv, backend="eager")
                    for backend in group.backends:
                        for check in wanted:
                            if (check == "graph replay" and kv != model.recursion.kv
                                    or check == "non-finite input" and batch < 2):
                                continue
                            checker.run(check, backend, name, case,
                                        lambda model_d=model_d: _check_model(
                                            checker, check, model_d, low, depths, kv, backend, theirs,
                                            reference, FLOOR_MODEL[name]))
                del model_d
        del model, model64
        if checker.device.type == "cuda":
            torch.cuda.empty_cache()


def _check_model(checker, check, model, images, depths, kv, backend, theirs, reference, floor):
    torch = checker.torch
    if check == "non-finite input":
        return _check_isolation(checker, model, images, depths, kv, backend, floor)
    if check == "graph replay":
        from .models.graph import compile_graph

        graphed = compile_graph(model, images, depths, backend=backend)
        # The replay must follow new inputs: the checked call sees images the capture never saw.
        fresh = checker.randn(*images.shape, dtype=images.dtype)
        with torch.no_grad():
            theirs = model(fresh, depths=depths, kv=kv, backend="eager")
            reference = copy.deepcopy(model).double()(fresh.double(), depths=depths, kv=kv, backend="eager")
        return checker.rule(lambda: graphed(fresh, depths), theirs, reference, floor)
    recursion = model.recursion
    previous = recursion.static_shapes
    recursion.static_shapes = check == "model sync-free"
    try:
        with torch.no_grad():
            forward = functools.partial(model, images, depths=depths, kv=kv, backend=backend)
            if check == "model sync-free" and checker.device.type == "cuda":
                forward()  # compiles the kernels outside the sync check
                return checker.rule(lambda: _without_host_sync(forward), theirs, reference, floor)
            return checker.rule(forward, theirs, reference, floor)
    finally:
        recursion.static_shapes = previous


def _check_isolation(checker, model, images, depths, kv, backend, floor):
    """A NaN pixel in image 0: the largest change of the other images' logits from a clean run's
    (bound: the model floor), and a note on what image 0's logits became."""
    torch = checker.torch
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the Triton interpreter's NumPy meets the NaN
        forward = functools.partial(model, depths=depths, kv=kv, backend=backend)
        clean = forward(images)
        ours, ms = checker.timed(lambda: forward(poisoned))
    change = (ours[1:] - clean[1:]).abs().nan_to_num(nan=float("inf")).max()
    image0 = "NaN" if bool(torch.isnan(ours[0]).any()) else "finite"
    return float(change), floor, ms, f"image 0's logits: {image0} (not checked, not raised)"


def _without_host_sync(fn):
    """``fn()`` with CUDA sync debug mode "error": any host synchronisation raises."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------
# Report and command line


def environment(device: str) -> dict:
    import torch

    from . import __version__
    from .bench.settings import cpu_name, module_version

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2 ** 30:.0f} GiB)"
    else:
        name = f"{cpu_name()}, {os.cpu_count()} cores"
    return {"recvit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": module_version("triton"),
            "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1" and device == "cpu",
            "device": device, "device_name": name}


HEADER = f"{'check':<20} {'backend':<7} {'dtype':<8} {'case':<36} {'max err':>9} {'bound':>9} {'ms':>8}  result"


def format_result(r: Result) -> str:
    def number(value, exact=False):
        if value is None:
            return "-"
        if exact:
            return f"{int(value)}" if value == int(value) else f"{value:.2e}"
        return f"{value:.2e}"

    exact = r.bound == 0
    bound = "exact" if exact and r.status != "skip" else number(r.bound)
    ms = "-" if r.ms is None else f"{r.ms:.1f}"
    line = (f"{r.check:<20} {r.backend:<7} {r.dtype:<8} {r.case:<36} {number(r.error, exact):>9} "
            f"{bound:>9} {ms:>8}  {r.status}")
    return f"{line}  {r.note}" if r.note else line


def backend_status(name: str, reason: Optional[str]) -> str:
    """How ``recvit info`` and ``recvit check`` state a backend: ``available``, ``unavailable: why``,
    or, for triton on a machine without a CUDA GPU where triton imports, ``interpreter only`` whether
    or not ``TRITON_INTERPRET=1`` is set (``recvit check`` sets it), so both commands say the same."""
    import torch

    if name == "triton" and "triton" in sys.modules and not torch.cuda.is_available():
        state = "set" if os.environ.get("TRITON_INTERPRET") == "1" else "not set (recvit check sets it)"
        return (f"interpreter only: no CUDA GPU; TRITON_INTERPRET=1 is {state}: the kernels then run on the "
                "CPU, slowly, to check them")
    return "available" if reason is None else f"unavailable: {reason}"


def _enable_triton_interpreter() -> Optional[str]:
    """Set ``TRITON_INTERPRET=1`` for a CPU check, which works only before the triton backend (and
    triton) load: the kernels are interpreted or compiled when their module is imported. Returns
    why the interpreter is off, or None."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if "recvit_kernels.triton" in sys.modules or "triton" in sys.modules:
        return ("triton was imported before TRITON_INTERPRET=1 could be set; run "
                "`TRITON_INTERPRET=1 recvit check --device cpu` to check it on the CPU")
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to check (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes: Base only on CUDA; on a CPU Tiny at batch 1 and 4 (the model at 112 px), "
                        "fp32, the interpreted Triton model at batch 3 only")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument("--backends", nargs="+", choices=("packed", "triton", "cuda"), default=None,
                        help="check only these backends (default: every available one; eager is the "
                        "reference, its depth sort and pack/unpack are checked against the definition)")
    parser.add_argument("--only", nargs="+", metavar="CHECK", default=None,
                        help=f"run the checks whose name contains one of these (names: {', '.join(CHECKS)})")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPE_NAMES), default=None,
                        help="check the floating-point ops and models in these dtypes only (default: every "
                        "dtype of the plan; the depth sort and pack/unpack run in any case)")


def run(args, sub: argparse.ArgumentParser) -> int:
    """``recvit check``: print the table, write ``--json``; 1 if any check failed."""
    if args.only is not None:
        unknown = [part for part in args.only if not any(part in check for check in CHECKS)]
        if unknown:
            sub.error(f"argument --only: {unknown} match no check; names: {', '.join(CHECKS)}")
    if args.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        sub.error(f"argument --json: directory does not exist: {os.path.dirname(os.path.abspath(args.json))}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sub.error("argument --device: cuda requested but torch sees no CUDA device "
                  f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    interpreter_note = _enable_triton_interpreter() if device == "cpu" else None
    import recvit_kernels as rk

    start = time.perf_counter()
    env = environment(device)
    availability = rk.available_backends()
    if device == "cpu" and availability.get("cuda") is None:
        availability["cuda"] = "checked with --device cuda"
    print(f"recvit check: recvit {env['recvit']}, python {env['python']}, torch {env['torch']}"
          f"{'' if env['cuda'] is None else ' (CUDA ' + env['cuda'] + ')'}, triton {env['triton'] or 'not installed'}"
          f"{' (interpreter)' if env['triton_interpreter'] else ''}")
    print(f"device: {device}: {env['device_name']}")
    for name, reason in availability.items():
        print(f"  {name:<7} {backend_status(name, reason)}")
    if interpreter_note:
        print(f"note: {interpreter_note}")
    backends = [name for name, reason in availability.items() if reason is None and name != "eager"
                and (args.backends is None or name in args.backends)]
    if args.backends is not None and not backends:
        print(f"note: none of --backends {' '.join(args.backends)} is available here")
    print(f"Pass: error vs a float64 reference <= bound = 2 x eager's error in the same dtype + floor "
          f"(flash-attention's rule); 'exact': entries that differ. ms: one call"
          f"{' after a warm-up call' if device == 'cuda' else ''}.")
    print("Non-finite input: not checked for (a host sync); a NaN or inf pixel makes its own image's "
          "outputs non-finite and leaves the other images' unchanged ('non-finite input': a NaN pixel "
          "in image 0, the others against a clean run).")
    print()
    print(HEADER)

    def report(result: Result) -> None:
        print(format_result(result), flush=True)

    checker = _Checker(device, args.only, report)
    op_groups, model_groups = plan(device, args.quick, backends)
    if args.dtypes is not None:
        op_groups, model_groups = only_dtypes(op_groups, args.dtypes), only_dtypes(model_groups, args.dtypes)
        model_groups = [group for group in model_groups if group.dtypes]
    for group in op_groups:
        check_ops(checker, group)
    for group in model_groups:
        check_models(checker, group)
    results = checker.results
    counts = {status: sum(r.status == status for r in results) for status in ("pass", "FAIL", "skip")}
    seconds = time.perf_counter() - start
    print()
    print(f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped "
          f"in {seconds:.1f} s on {device}")
    for r in results:
        if r.status == "FAIL":
            print(f"FAILED: {r.check} [{r.backend}, {r.dtype}, {r.case}]"
                  + (f": {r.note}" if r.note else f": error {r.error:.3e} > bound {r.bound:.3e}"))
    if not results:
        print(f"FAILED: no check ran on {device} (--only {' '.join(args.only or [])}"
              f"{', --backends ' + ' '.join(args.backends) if args.backends else ''}; graph replay needs CUDA)")
    passed = bool(results) and counts["FAIL"] == 0
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump({**env, "quick": args.quick, "only": args.only, "backends": availability,
                       "seconds": round(seconds, 2), "passed": passed,
                       "checks": [asdict(r) for r in results]}, handle, indent=1)
            handle.write("\n")
        print(f"wrote {args.json}")
    return 0 if passed else 1
