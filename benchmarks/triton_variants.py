"""Every Triton kernel variant the model launches, compiled ahead of time for sm_80 and sm_90.

``python -m benchmarks.triton_variants`` runs Edge-RecViT-Base (batch 1, 8 and 256: the GPU run's
headline batches, each of which picks its own GEMM tiles; bf16, fp16, fp32, fp32 with TF32
allowed; the static and the packed path; kv "active" and "all"; random depths, two draws at batch 1
and one at 8 and 256) on CPU tensors under a fake Triton driver, collects
every distinct specialisation the Triton launches ask for, compiles each with ``triton.compile``
for ``GPUTarget("cuda", 80, 32)`` and ``GPUTarget("cuda", 90, 32)`` and writes
``benchmarks/triton_variants.md`` and ``.json``:
kernel, constexprs, warps, stages, registers, spill (stack) bytes, shared memory, mma kind, per
architecture, for the installed Triton version (``--also PYTHON`` runs the same in another
interpreter first, e.g. a venv with triton 3.6.0; each version keeps its entry). No GPU is needed.
Triton's on-disk cache (``TRITON_CACHE_DIR``) makes a rerun of unchanged variants fast.

How the trace works (:func:`trace`): the Triton backend is switched on for CPU tensors; Triton's
active driver is replaced by one that names a CUDA target; ``triton.knobs.runtime.jit_cache_hook``
(Triton's own hook, called with the exact signature, constexprs, divisibility attributes and
options a launch would compile) records the launch and tells Triton to skip it; a
``TorchDispatchMode`` skips every aten op whose outputs are all floating point (it allocates the
outputs, uninitialised, from the op's meta shapes) so a batch-256 Base forward costs about a
second on a CPU; integer ops (the depth sort, lengths, index tables) run for real. Pointer
alignment comes from real CPU tensors, so slices of one tensor specialise as they would on a GPU.

Registers and spills come from ``cuobjdump -res-usage`` on the cubin (Triton's own copy of the
tool), shared memory from the compiled kernel's metadata, the mma kind from the PTX (``wgmma`` on
sm_90 Hopper tensor cores, ``mma.sync`` on sm_80 ones, ``none`` when no instruction reaches the
tensor cores: element-wise kernels, and IEEE fp32 dots, which run on the FMA units).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parent
CAPABILITIES = (80, 90)
# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# name -> (dtype, torch.backends.cuda.matmul.allow_tf32): fp32 GEMMs and attention follow that flag.
DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False),
          "fp32-tf32": (torch.float32, True)}
BATCHES = (1, 8, 256)  # benchmarks/gpu_run.sh's headline batches (tests/test_triton_compile.py)
PATHS = ("static", "packed")
KV_MODES = ("active", "all")
# Depth draws per batch size. Two at batch 1, where one draw's 12 live counts could miss a case;
# one at batch 8 and 256, whose 12 steps already alternate the alignment of the length slices and
# vary the live counts' residues mod 16 (a second draw there would double the trace's cost).
DRAWS = {1: (0, 1), 8: (0,), 256: (0,)}
# Options a launch passes that change the compiled code (the rest are Triton's defaults).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ----------------------------------------------------------------------------------------------
# The trace


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of a Triton kernel, as a launch asks for it."""
    kernel: str                          # module.qualname of the @triton.jit function
    signature: tuple                     # ((arg name, type), ...) without constexprs
    constexprs: tuple                    # ((arg name, value), ...)
    attrs: tuple                         # ((arg name, hints), ...): divisibility etc.
    options: tuple                       # ((option, value), ...) from LAUNCH_OPTIONS

    @property
    def name(self) -> str:
        return self.kernel.rsplit(".", 1)[1]


@dataclass
class Trace:
    """Launches recorded by :func:`trace`, in order, with the setting that made each."""
    launches: list = field(default_factory=list)  # (setting dict, Variant)

    def variants(self) -> dict:
        """Distinct variants -> the settings that launched them (first seen order)."""
        seen: dict = {}
        for setting, variant in self.launches:
            tags = seen.setdefault(variant, [])
            if setting not in tags:
                tags.append(setting)
        return seen


class _FakeDriver:
    """Triton's active driver, minus the GPU: names a CUDA target, never launches."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _name_of(kernel, path) -> str:
    index = path[0] if isinstance(path, tuple) else path
    return kernel.arg_names[index]


def _record(trace: Trace, setting: dict):
    def hook(*, fn, compile, **_):
        kernel = fn.jit_function
        constexprs = compile["constants"]
        signature = tuple((name, ty) for name, ty in compile["signature"].items() if ty != "constexpr")
        attrs = compile["configs"][0] if compile["configs"] else {}
        variant = Variant(
            kernel=f"{kernel.fn.__module__}.{kernel.fn.__qualname__}",
            signature=signature,
            constexprs=tuple(sorted((_name_of(kernel, k), v) for k, v in constexprs.items())),
            attrs=tuple(sorted((_name_of(kernel, k), tuple(tuple(a) for a in v))
                               for k, v in attrs.items() if v)),
            options=tuple((key, compile[key]) for key in LAUNCH_OPTIONS if key in compile))
        trace.launches.append((dict(setting), variant))
        return True  # Triton: "handled", skip the compile and the launch

    return hook


def _is_float_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


class _SkipFloatMath(TorchDispatchMode):
    """Run integer/bool aten ops for real; give float-only results uninitialised, without math.

    The ``recvit::`` custom ops run for real (their Triton launches are what is recorded; the
    aten ops inside them run outside this mode, for real too).

    Views run for real (they alias their input). An in-place or ``out=`` op writing a float
    tensor is skipped and returns that tensor. A functional op whose outputs are all floating
    point runs on meta tensors for its output shapes and strides, which are then allocated empty.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "recvit":  # a kernel backend's custom op: run it, it launches kernels
            return func(*args, **kwargs)
        schema = func._schema
        returns = schema.returns
        if any(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return func(*args, **kwargs)  # a view
        written = [a for a, arg in zip(schema.arguments, list(args) + [None] * len(schema.arguments))
                   if a.alias_info is not None and a.alias_info.is_write]
        if written:
            targets = [kwargs.get(a.name) if a.kwarg_only else args[schema.arguments.index(a)]
                       for a in written]
            flat = [t for t, _ in [tree_flatten(t) for t in targets] for t in t]
            if flat and all(_is_float_tensor(t) for t in flat):
                return targets[0] if len(targets) == 1 else tuple(targets)
            return func(*args, **kwargs)
        if not returns or not all(str(r.type) in ("Tensor", "Tensor[]") for r in returns):
            return func(*args, **kwargs)
        to_meta = lambda x: (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
                             if isinstance(x, torch.Tensor) else x)
        meta_kwargs = {**tree_map(to_meta, kwargs), **({"device": "meta"} if "device" in kwargs else {})}
        try:
            meta = func(*tree_map(to_meta, args), **meta_kwargs)
        except (NotImplementedError, RuntimeError):
            return func(*args, **kwargs)
        outputs, spec = tree_flatten(meta)
        if not outputs or not all(_is_float_tensor(o) for o in outputs):
            return func(*args, **kwargs)
        device = kwargs.get("device") or next(
            x.device for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor))
        return tree_map(lambda o: torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=device),
                        meta)


def _triton_modules():
    import recvit_kernels.triton as package

    return [importlib.import_module(f"{package.__name__}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)]


@contextlib.contextmanager
def fake_triton(capability: int, trace: Trace, setting: dict):
    """Within: the triton backend takes CPU tensors, launches are recorded into ``trace`` (with
    ``setting``) instead of run, and float math is skipped."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # triton.jit made interpreted functions
        raise RuntimeError("TRITON_INTERPRET=1: the trace needs Triton's compiler, not its interpreter")
    import triton
    from triton.runtime import driver

    from recvit_kernels import _backend
    from recvit_kernels.triton import _common

    modules = _triton_modules()  # importing them registers the ops
    real_reason = _common.device_reason

    def device_reason(name, tensor):  # a CPU tensor passes as a CUDA one would
        if tensor.device.type == "cpu" and tensor.dtype in _common.DTYPES:
            return None
        return real_reason(name, tensor)

    patched = [m for m in modules if getattr(m, "device_reason", None) is real_reason]
    previous_availability = _backend._AVAILABILITY.get("triton")
    _backend.register_availability("triton", lambda: None)
    for module in patched:
        module.device_reason = device_reason
    previous_hook = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = _record(trace, setting)
    kernels = [value for module in modules for value in vars(module).values()
               if isinstance(value, triton.runtime.JITFunction)]
    driver.set_active(_FakeDriver(capability))
    for kernel in kernels:  # binders cache the target per kernel: fresh ones for the fake one
        kernel.device_caches.clear()
    try:
        with _SkipFloatMath():
            yield
    finally:
        driver._active = None
        for kernel in kernels:  # and none built for it left behind
            kernel.device_caches.clear()
        triton.knobs.runtime.jit_cache_hook = previous_hook
        for module in patched:
            module.device_reason = real_reason
        if previous_availability is not None:
            _backend.register_availability("triton", previous_availability)


@contextlib.contextmanager
def _allow_tf32(flag: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def depth_draw(batch: int, tokens: int, num_steps: int, seed: int) -> torch.Tensor:
    """Random depths in 1..L, [CLS] at L: every step's live row count is data, not shape."""
    generator = torch.Generator().manual_seed(seed)
    depths = torch.randint(1, num_steps + 1, (batch, tokens), generator=generator)
    depths[:, 0] = num_steps
    return depths


def settings(batches=BATCHES, dtypes=tuple(DTYPES), paths=PATHS, kv_modes=KV_MODES) -> list:
    return [dict(batch=b, dtype=d, path=p, kv=kv) for b in batches for d in dtypes for p in paths
            for kv in kv_modes]


def trace(model_name: str = "edge_recvit_base", settings_list: Optional[Iterable[dict]] = None,
          draws: Optional[dict] = None, capability: int = 90) -> Trace:
    """Forward ``model_name`` once per depth draw in every setting; record the launches.

    ``draws``: batch -> depth-draw seeds, default :data:`DRAWS`.
    """
    draws = DRAWS if draws is None else draws
    import recvit

    result = Trace()
    model = recvit.create_model(model_name).eval()
    for setting in settings_list if settings_list is not None else settings():
        dtype, allow_tf32 = DTYPES[setting["dtype"]]
        model.to(dtype)
        model.recursion.static_shapes = setting["path"] == "static"
        size = model.patch_embed.img_size
        for seed in draws.get(setting["batch"], (0,)):
            depths = depth_draw(setting["batch"], model.num_tokens, model.num_steps, seed)
            images = torch.empty(setting["batch"], 3, size, size, dtype=dtype)
            with torch.no_grad(), _allow_tf32(allow_tf32), \
                    fake_triton(capability, result, {**setting, "seed": seed}):
                model(images, depths=depths, kv=setting["kv"], backend="triton")
    return result


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile of each variant


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.is_file() else "cuobjdump"


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{text}")
    registers, stack, _, local = map(int, match.groups())
    return dict(registers=registers, spill_bytes=stack, local_bytes=local)


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none"


def compile_variant(variant: Variant, capability: int) -> dict:
    """Compile ``variant`` for sm_``capability``: registers, spill bytes, shared memory, mma kind."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, qualname = variant.kernel.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), qualname)
    index = {name: i for i, name in enumerate(fn.arg_names)}
    signature = {name: ty for name, ty in variant.signature}
    signature.update({name: "constexpr" for name, _ in variant.constexprs})
    signature = {name: signature[name] for name in fn.arg_names}
    constexprs = {(index[name],): value for name, value in variant.constexprs}
    attrs = {(index[name],): [list(a) for a in hints] for name, hints in variant.attrs}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                            target=GPUTarget("cuda", capability, 32), options=dict(variant.options))
    return dict(**_resources(kernel.asm["cubin"]), shared_bytes=kernel.metadata.shared,
                mma=_mma_kind(kernel.asm["ptx"]))


# ----------------------------------------------------------------------------------------------
# The table


def _short(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def setting_name(setting: dict) -> str:
    return f"{setting['dtype']}/b{setting['batch']}/{setting['path']}/kv={setting['kv']}"


def report(variants: dict, capabilities=CAPABILITIES) -> dict:
    """One Triton version's entry: every variant with the settings that launched it, compiled."""
    import triton

    rows = []
    for variant, tags in variants.items():
        module, qualname = variant.kernel.rsplit(".", 1)
        fn = getattr(importlib.import_module(module), qualname)
        pointers = [ty for _, ty in variant.signature if ty.startswith("*")]
        row = dict(kernel=variant.name, dtype=pointers[0][1:], constexprs=dict(variant.constexprs),
                   declared=[p.name for p in fn.params if p.is_constexpr],
                   options=dict(variant.options), signature=dict(variant.signature),
                   attrs={name: hints for name, hints in variant.attrs},
                   launched_by=sorted({setting_name(t) for t in tags}), compiled={})
        for capability in capabilities:
            row["compiled"][f"sm_{capability}"] = compile_variant(variant, capability)
        rows.append(row)
    return dict(triton=triton.__version__, torch=torch.__version__,
                shared_limit={f"sm_{c}": SHARED_LIMIT[c] for c in capabilities}, variants=rows)


def problems(entry: dict) -> list:
    """Every variant that spills or needs more shared memory than its architecture has."""
    found = []
    for row in entry["variants"]:
        for arch, res in row["compiled"].items():
            if res["spill_bytes"] or res["local_bytes"]:
                found.append(f"{row['kernel']} {row['constexprs']} {row['options']} on {arch}: "
                             f"{res['spill_bytes']} B stack, {res['local_bytes']} B local")
            if res["shared_bytes"] > entry["shared_limit"][arch]:
                found.append(f"{row['kernel']} {row['constexprs']} on {arch}: {res['shared_bytes']} B "
                             f"shared > {entry['shared_limit'][arch]}")
    return found


def _table(entry: dict) -> list:
    archs = list(entry["shared_limit"])
    head = ["kernel", "dtype", "constexprs", "warps", "stages"]
    for arch in archs:
        head += [f"{arch} regs", f"{arch} spill B", f"{arch} smem B", f"{arch} mma"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = lambda r: (r["kernel"], json.dumps(r["constexprs"], sort_keys=True), json.dumps(r["options"]),
                       json.dumps(r["signature"]), json.dumps(r["attrs"], sort_keys=True))
    for row in sorted(entry["variants"], key=order):
        cells = [row["kernel"].strip("_").replace("_kernel", ""),
                 row["dtype"],
                 ", ".join(f"{k}={_short(v)}" for k, v in row["constexprs"].items() if k in row["declared"]),
                 str(row["options"].get("num_warps")), str(row["options"].get("num_stages"))]
        for arch in archs:
            res = row["compiled"][arch]
            cells += [str(res["registers"]), str(res["spill_bytes"]), str(res["shared_bytes"]), res["mma"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    lines = ["# Triton kernel variants launched by Edge-RecViT-Base", "",
             "Written by `python -m benchmarks.triton_variants` (no GPU needed; see its docstring): "
             f"Edge-RecViT-Base at batch {', '.join(map(str, BATCHES))}, {', '.join(DTYPES)} "
             "(fp32-tf32: fp32 with `torch.backends.cuda.matmul.allow_tf32 = True`), the static "
             "(`RecursiveBlock.static_shapes`) and packed paths, kv active and all, random depths "
             "(two draws at batch 1, one at 8 and 256), on the triton backend. Every distinct "
             "specialisation the launches ask for is "
             "compiled with `triton.compile` for sm_80 and sm_90. regs / spill B (per-thread stack) from "
             "`cuobjdump -res-usage`, smem B from the kernel's metadata, mma from the PTX "
             "(`none`: no tensor-core instruction; IEEE fp32 dots run on the FMA units); dtype: the first "
             "pointer argument's (x, q). Constexprs listed are the kernels' own; "
             "Triton's value specialisations (stride 1, divisibility by 16) are in the JSON.", ""]
    for version, entry in sorted(results.items(), reverse=True):
        found = problems(entry)
        lines += [f"## triton {version} (torch {entry['torch']})", "",
                  f"{len(entry['variants'])} variants; shared-memory limits {entry['shared_limit']}. "
                  f"Spills or shared memory over the limit: {len(found) or 'none'}.", ""]
        lines += _table(entry) + [""] + [f"- {p}" for p in found] + ([""] if found else [])
    return "\n".join(lines)


def dump(results: dict) -> str:
    """The JSON text: one line per variant, so that a rerun's diff shows what changed."""
    versions = []
    for version, entry in sorted(results.items()):
        fields = [f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)}"
                  for key, value in entry.items() if key != "variants"]
        rows = ",\n".join(f"   {json.dumps(row, sort_keys=True)}" for row in entry["variants"])
        fields.append(f'  "variants": [\n{rows}\n  ]')
        versions.append(f" {json.dumps(version)}: {{\n" + ",\n".join(fields) + "\n }")
    return "{\n" + ",\n".join(versions) + "\n}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "triton_variants",
                        help="path without suffix: updates this Triton version's entry of OUT.json "
                             "(keyed by version) and rewrites OUT.md from all entries")
    parser.add_argument("--also", nargs="*", default=[], metavar="PYTHON",
                        help="other Python interpreters (another Triton version installed) to run "
                             "this same command in first, e.g. a venv with triton==3.6.0")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud
    status = 0
    for python in args.also:
        given = argv if argv is not None else sys.argv[1:]
        rest = [a for a in given if a != "--also" and a not in args.also]
        status |= subprocess.run([python, "-m", "benchmarks.triton_variants", *rest], env=env,
                                 cwd=ROOT.parent).returncode
    start = time.perf_counter()
    traced = trace(settings_list=settings(tuple(args.batches), tuple(args.dtypes)))
    trace_s = time.perf_counter() - start
    entry = report(traced.variants())
    compile_s = time.perf_counter() - start - trace_s
    path = args.out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[entry["triton"]] = entry
    path.write_text(dump(results))
    args.out.with_suffix(".md").write_text(markdown(results))
    found = problems(entry)
    print(f"triton {entry['triton']}: {len(entry['variants'])} variants from {len(traced.launches)} "
          f"launches, traced in {trace_s:.1f} s, compiled for {list(entry['shared_limit'])} in "
          f"{compile_s:.1f} s; {len(found)} spilling or over shared memory")
    for line in found:
        print(" ", line)
    return status | (1 if found else 0)


if __name__ == "__main__":
    sys.exit(main())
