"""Every GPU op once, at small sizes with the edges, for compute-sanitizer (memcheck, racecheck).

``python benchmarks/sanitize_ops.py [--device cuda|cpu]``; ``benchmarks/gpu_run.sh check`` runs it as
``compute-sanitizer --tool memcheck|racecheck python benchmarks/sanitize_ops.py``.

For the cuda and triton backends (those available), fp16 and bf16: the depth sort, then at steps
1, 2, L/2 and L varlen attention (kv active and all, in both forms of ``recvit.check.attention_forms``:
compact index tables at the static bound, and the model's one ``image_order`` table with
``seqused_q/k``), LayerNorm with and without the
residual (and on the live rows, ``num_rows``), the MLP and prefix_linear (also ``out=`` into the
residual, as fc2's epilogue; hidden width 320: partial tiles, and racecheck stays fast), and for
triton the backward of LayerNorm + prefix_linear (GELU, residual) on the live rows and of the MLP, on
two batches: three images of
197 tokens (random depths; every patch token exiting at step 1; every token at depth L) and two
images of one token. The ops go through the public API with ``backend=`` named. Each result must be finite and each op
is followed by a synchronisation, so that a fault is reported at the op that made it.

``--device cpu`` runs the triton backend under the Triton interpreter at a small width (set before
triton loads): it proves the script runs, on a machine without a GPU (CI).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before recvit_kernels loads triton
    import torch

    import recvit_kernels as rk
    from recvit.check import attention_forms

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: no CUDA device visible")
    device = torch.device(args.device)
    backends = [b for b in (("cuda", "triton") if args.device == "cuda" else ("triton",))
                if rk.unavailable_reason(b) is None]
    for name in ("cuda", "triton"):
        print(f"{name}: {rk.unavailable_reason(name) or 'available'}")
    if not backends:
        print("no GPU backend available: nothing to sanitize")
        return 1
    dim, heads, tokens = (768, 12, 197) if args.device == "cuda" else (64, 2, 17)
    hidden = 320 if args.device == "cuda" else 96  # GEMM width: small (racecheck is slow), partial tiles
    dtypes = (torch.float16, torch.bfloat16) if args.device == "cuda" else (torch.float16,)
    steps = 12
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(1, steps + 1, (tokens,), generator=generator)
    batches = {
        "3 images, random / all exit at 1 / all at L": torch.stack(
            [random, torch.ones(tokens, dtype=torch.long), torch.full((tokens,), steps)]),
        "2 images of 1 token": torch.full((2, 1), steps),
    }
    calls = 0

    def done(what, *outputs):
        nonlocal calls
        if device.type == "cuda":
            torch.cuda.synchronize()
        for out in outputs:
            if not torch.isfinite(out.float()).all():
                raise SystemExit(f"FAILED: {what}: non-finite output")
        calls += 1

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    for backend in backends:
        for dtype in dtypes:
            for label, depths in batches.items():
                depths = depths.clone()
                depths[:, 0] = steps
                depths = depths.to(device)
                layout = rk.depth_sort(depths, steps, backend=backend)
                done(f"{backend} depth_sort {label}", layout.perm.double())
                total, count = depths.numel(), depths.shape[1]
                qkv = randn(total, 3, heads, dim // heads, dtype=dtype)
                q, k, v = qkv.unbind(1)
                for step in sorted({1, 2, steps // 2, steps}):
                    for kv in ("active", "all"):
                        for form, (cu_q, cu_k, tables, covered) in attention_forms(layout, step, kv).items():
                            out = rk.varlen_attention(q, k, v, cu_q, cu_k, count, count, **tables,
                                                      backend=backend)
                            done(f"{backend} {dtype} varlen_attention {form} {label} step {step} kv={kv}",
                                 out if covered is None else out[covered])
                x, residual = randn(total, dim, dtype=dtype), randn(total, dim, dtype=dtype)
                weight, bias = 1 + randn(dim, dtype=dtype, scale=0.1), randn(dim, dtype=dtype, scale=0.1)
                done(f"{backend} {dtype} layer_norm {label}",
                     rk.layer_norm(x, weight, bias, 1e-6, backend=backend))
                done(f"{backend} {dtype} layer_norm+residual {label}",
                     *rk.layer_norm(x, weight, bias, 1e-6, residual, backend=backend))
                fc1_w, fc1_b = randn(hidden, dim, dtype=dtype, scale=dim ** -0.5), randn(hidden, dtype=dtype)
                fc2_w, fc2_b = randn(dim, hidden, dtype=dtype, scale=hidden ** -0.5), randn(dim, dtype=dtype)
                done(f"{backend} {dtype} mlp {label}",
                     rk.mlp(x, fc1_w, fc1_b, fc2_w, fc2_b, residual, backend=backend))
                proj_w = randn(dim, dim, dtype=dtype, scale=dim ** -0.5)
                for step in (1, steps):
                    live = layout.step_rows[step - 1:step]
                    num_live = int(live)  # the rows past it are unspecified: nothing writes them
                    done(f"{backend} {dtype} prefix_linear {label} step {step}",
                         rk.prefix_linear(x, fc1_w, fc1_b, live, "gelu", None, backend=backend)[:num_live],
                         rk.prefix_linear(x, proj_w, None, live, None, residual, backend=backend)[:num_live])
                    in_place = residual.clone()  # fc2's epilogue: the live rows written into the residual
                    rk.prefix_linear(x, proj_w, None, live, None, in_place, out=in_place, backend=backend)
                    done(f"{backend} {dtype} prefix_linear out= {label} step {step}", in_place)
                    normed, summed = rk.layer_norm(x, weight, bias, 1e-6, residual, num_rows=live,
                                                   backend=backend)
                    done(f"{backend} {dtype} layer_norm num_rows {label} step {step}",
                         normed[:num_live], summed[:num_live])
                    if backend == "triton":  # the backward kernels, as a training step runs them
                        leaves = [t.detach().requires_grad_() for t in (x, residual, weight, bias, fc1_w,
                                                                        fc1_b, fc2_w, fc2_b)]
                        lx, lr, lw, lb, l1w, l1b, l2w, l2b = leaves
                        normed, summed = rk.layer_norm(lx, lw, lb, 1e-6, lr, num_rows=live, backend=backend)
                        hidden_rows = rk.prefix_linear(normed, l1w, l1b, live, "gelu", None, backend=backend)
                        out = rk.prefix_linear(hidden_rows, l2w, l2b, live, None, summed, backend=backend)
                        out.backward(randn(*out.shape, dtype=dtype))
                        done(f"{backend} {dtype} layer_norm + prefix_linear backward {label} step {step}",
                             *[t.grad for t in leaves])
                if backend == "triton":
                    leaves = [t.detach().requires_grad_() for t in (x, fc1_w, fc1_b, fc2_w, fc2_b, residual)]
                    out = rk.mlp(*leaves, backend=backend)
                    out.backward(randn(*out.shape, dtype=dtype))
                    done(f"{backend} {dtype} mlp backward {label}", *[t.grad for t in leaves])
            print(f"{backend} {str(dtype).removeprefix('torch.')}: every op ran", flush=True)
    print(f"sanitize_ops: {calls} op calls on {args.device}, backends {', '.join(backends)}: all finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
