"""Every Triton variant Edge-RecViT-Base launches compiles for sm_80 and sm_90 without spilling,
no variant is compiled twice for data, and the committed variant table is current.

One subprocess (the Triton compiler, not its interpreter) runs ``python -m benchmarks.triton_variants``:
it traces Base at batch 1, 8 and 256 (the GPU run's headline batches) in bf16/fp16/fp32/fp32-tf32, on
the static and packed paths with kv active and all, random depths (two draws at batch 1, one at 8
and 256), under a fake Triton driver,
and compiles each distinct launched variant for both architectures (see that module). No GPU
needed; about 90 s of CPU on a clean Triton cache.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "triton_variants.json"
DOT_KERNELS = ("_prefix_linear_kernel", "_varlen_attention_kernel")


def _has_nvidia_backend(env):
    probe = subprocess.run([sys.executable, "-c", "import triton.backends as b; print(list(b.backends))"],
                           capture_output=True, text=True, env=env)
    return "nvidia" in probe.stdout


def _compiler_env():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """This Triton version's entry of a fresh variant table."""
    env = _compiler_env()
    if not _has_nvidia_backend(env):
        pytest.skip("this triton has no nvidia backend")
    out = tmp_path_factory.mktemp("variants") / "variants"
    result = subprocess.run([sys.executable, "-m", "benchmarks.triton_variants", "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert out.with_suffix(".json").is_file(), result.stdout[-2000:] + result.stderr[-4000:]
    (results,) = json.loads(out.with_suffix(".json").read_text()).values()
    print(result.stdout)
    return results


def test_every_setting_was_traced(entry):
    launched = {name for row in entry["variants"] for name in row["launched_by"]}
    expected = {f"{d}/b{b}/{p}/kv={kv}" for d in ("bf16", "fp16", "fp32", "fp32-tf32") for b in (1, 8, 256)
                for p in ("static", "packed") for kv in ("active", "all")}
    assert launched == expected
    assert {row["kernel"] for row in entry["variants"]} >= set(DOT_KERNELS)


def _assert_compiles_cleanly(report, dot_kernels=()):
    """Every variant of a ``benchmarks.triton_variants`` report, on every arch: no spill, shared memory
    within the limit; the kernels named in ``dot_kernels`` on tensor cores unless IEEE fp32."""
    for row in report["variants"]:
        for arch, res in row["compiled"].items():
            where = f"{row['kernel']} {row['constexprs']} {row['options']} on {arch}"
            assert res["spill_bytes"] == 0 and res["local_bytes"] == 0, f"{where} spills: {res}"
            assert res["shared_bytes"] <= report["shared_limit"][arch], f"{where}: {res}"
            if row["kernel"] in dot_kernels:
                ieee = row["dtype"] == "fp32" and row["constexprs"]["PRECISION"] == "ieee"
                assert (res["mma"] == "none") == ieee, f"{where}: {res}"


def _compile_script(script, timeout):
    """The report a script prints as its last line, run where Triton compiles for the GPU targets."""
    env = _compiler_env()
    if not _has_nvidia_backend(env):
        pytest.skip("this triton has no nvidia backend")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_every_launched_variant_compiles_without_spills(entry):
    _assert_compiles_cleanly(entry)


def test_dots_use_tensor_cores_unless_ieee_fp32(entry):
    """16-bit and TF32 dots run mma.sync (sm_80) / wgmma (sm_90, tiles of 64+ rows); IEEE fp32
    runs on the FMA units."""
    for row in (r for r in entry["variants"] if r["kernel"] in DOT_KERNELS):
        mma = {arch: res["mma"] for arch, res in row["compiled"].items()}
        if row["dtype"] == "fp32" and row["constexprs"]["PRECISION"] == "ieee":
            assert set(mma.values()) == {"none"}, row
            continue
        assert mma["sm_80"] == "mma.sync", row
        assert mma["sm_90"] == ("wgmma" if row["constexprs"]["BLOCK_M"] >= 64 else "mma.sync"), row


def test_no_variant_is_compiled_for_data(entry):
    """Per setting, over its forwards (two depth draws at batch 1): one variant per kernel
    configuration. Triton's value specialisations (16-byte alignment, divisibility by 16, equal to
    1) of the length slices and the live row counts must not fork a kernel (do_not_specialize)."""
    groups = defaultdict(list)
    for row in entry["variants"]:
        declared = {k: v for k, v in row["constexprs"].items() if k in row["declared"]}
        pointers = {k: v for k, v in row["signature"].items() if v.startswith("*")}
        for setting in row["launched_by"]:
            key = (setting, row["kernel"], json.dumps([declared, pointers, row["options"]], sort_keys=True))
            groups[key].append(row)
    forks = {key: [(r["constexprs"], r["attrs"]) for r in rows]
             for key, rows in groups.items() if len(rows) > 1}
    assert not forks, forks


def headline_batches() -> list[int]:
    """The batch sizes of benchmarks/gpu_run.sh's headline (Edge-RecViT-Base, bf16, on the GPU)."""
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    words = re.search(r"^HEADLINE=\((.*)\)$", script, re.M).group(1).split()
    after = words[words.index("--batch-sizes") + 1:]
    return [int(word) for word in after[:next((i for i, w in enumerate(after) if w.startswith("--")), len(after))]]


def test_committed_table_covers_the_headline_batches():
    """Each batch size picks its own GEMM tiles (batch 8's 64x128 appears at neither 1 nor 256), so
    the table must trace every batch the GPU run's headline times: a variant first compiled there
    is unchecked for spills and shared memory. No compile: reads the committed table."""
    batches = headline_batches()
    assert batches and 8 in batches, batches
    for version, table in json.loads(COMMITTED.read_text()).items():
        launched = {name for row in table["variants"] for name in row["launched_by"]}
        missing = [f"bf16/b{b}/{path}/kv={kv}" for b in batches for path in ("static", "packed")
                   for kv in ("active", "all") if f"bf16/b{b}/{path}/kv={kv}" not in launched]
        assert not missing, f"triton {version}: {missing}"


def test_committed_table_is_current(entry):
    """benchmarks/triton_variants.json lists exactly the variants launched today, for this Triton
    (rerun ``python -m benchmarks.triton_variants`` after changing a kernel or its launch)."""
    committed = json.loads(COMMITTED.read_text())
    if entry["triton"] not in committed:
        pytest.skip(f"the committed table has no entry for triton {entry['triton']}")

    def identities(rows):
        fields = ("kernel", "constexprs", "options", "signature", "attrs")
        return sorted(json.dumps([r[f] for f in fields], sort_keys=True) for r in rows)

    assert identities(committed[entry["triton"]]["variants"]) == identities(entry["variants"])


# The attention's training launches (the model's trace above runs under no_grad): the forward that
# stores the log-sum-exp and the backward, head_dim 64, the sync-free form's tables (kv active: used
# key lengths; kv all: none), each dtype setting.
_BACKWARD_SCRIPT = textwrap.dedent("""
    import json, torch
    from benchmarks.triton_variants import DTYPES, Trace, _allow_tf32, fake_triton, report
    from recvit_kernels.triton.varlen_attention import _launch
    from recvit_kernels.triton.varlen_attention_backward import varlen_attention_backward

    trace, batch, tokens, heads, head_dim = Trace(), 2, 197, 2, 64
    for name, (dtype, tf32) in DTYPES.items():
        for kv in ("active", "all"):
            setting = dict(dtype=name, batch=batch, path="backward", kv=kv)
            with _allow_tf32(tf32), fake_triton(90, trace, setting):
                total = batch * tokens
                q, k, v, out, grad_out = torch.randn(5, total, heads, head_dim).to(dtype).unbind(0)
                starts = torch.arange(0, total + 1, tokens, dtype=torch.int32)
                used = torch.full((batch,), 150, dtype=torch.int32)
                table = torch.randperm(total).to(torch.int32)
                _launch(q, k, v, starts, starts, tokens, tokens, head_dim ** -0.5, table, table, used,
                        used if kv == "active" else None, True)
                varlen_attention_backward(grad_out, q, k, v, out, torch.randn(total, heads), starts,
                                          starts, tokens, tokens, head_dim ** -0.5, table, table, used,
                                          used if kv == "active" else None)
    print(json.dumps(report(trace.variants())))
""")


def test_attention_training_kernels_compile_without_spills():
    """The forward storing the log-sum-exp, the dQ and the dK/dV kernels, in bf16/fp16/fp32/fp32-tf32
    and both kv modes, for sm_80 and sm_90: no spill, shared memory within the limit, tensor cores
    unless IEEE fp32."""
    backward = _compile_script(_BACKWARD_SCRIPT, timeout=600)
    kernels = {(row["kernel"], row["dtype"], row["constexprs"]["HAS_USED_K"]) for row in backward["variants"]}
    assert {kernel for kernel, _, _ in kernels} == {"_varlen_attention_kernel", "_varlen_attention_dq_kernel",
                                                    "_varlen_attention_dkdv_kernel"}
    assert len(kernels) == 3 * 3 * 2  # kernel x dtype (bf16, fp16, fp32) x kv mode
    assert all(row["constexprs"]["STORE_LSE"] for row in backward["variants"]
               if row["kernel"] == "_varlen_attention_kernel")
    _assert_compiles_cleanly(backward, dot_kernels={kernel for kernel, _, _ in kernels})


# The token-wise layers' training launches at Edge-RecViT-Base's shapes (batch 1 and 256, a live
# count on the device): the prefix linear's forward storing GELU's input, its backward (element-wise
# gradient rows, dX through the forward kernel, dW), the MLP epilogue's backward and the LayerNorm
# backward (width 768 with and without the fused residual and num_rows, and MAX_WIDTH 8192).
_TOKENWISE_BACKWARD_SCRIPT = textwrap.dedent("""
    import json, torch
    from benchmarks.triton_variants import DTYPES, Trace, _allow_tf32, fake_triton, report
    from recvit_kernels.triton.layer_norm import MAX_WIDTH
    from recvit_kernels.triton.layer_norm_backward import layer_norm_backward
    from recvit_kernels.triton.mlp_epilogue_backward import epilogue_backward
    from recvit_kernels.triton.prefix_gemm import launch as _launch
    from recvit_kernels.triton.prefix_linear_backward import prefix_linear_backward

    # (in, out, GELU, residual) of QKV, proj, fc1, fc2
    layers = ((768, 2304, False, False), (768, 768, False, False), (768, 3072, True, False),
              (3072, 768, False, True))
    trace = Trace()
    for name, (dtype, tf32) in DTYPES.items():
        for batch in (1, 256):
            rows = batch * 197
            setting = dict(dtype=name, batch=batch, path="backward", kv="-")
            with _allow_tf32(tf32), fake_triton(90, trace, setting):
                empty = lambda *shape: torch.empty(*shape, dtype=dtype)
                num_rows = torch.tensor([rows - 3])
                for k_dim, n_out, gelu, residual in layers:
                    x, grad, weight = empty(rows, k_dim), empty(rows, n_out), empty(n_out, k_dim)
                    pre = empty(rows, n_out) if gelu else None
                    _launch(x, weight, empty(n_out), num_rows, "gelu" if gelu else None,
                            grad if residual else None, empty(rows, n_out), pre)
                    prefix_linear_backward(grad, x, weight, num_rows, pre, True, needs_residual=residual)
                epilogue_backward(empty(rows, 3072), empty(rows, 3072), empty(3072))
                for width, residual, live in ((768, True, num_rows), (768, False, None),
                                              (MAX_WIDTH, True, num_rows)):
                    x = empty(rows, width)
                    layer_norm_backward(x, x if residual else None, x, empty(width), 1e-6, live)
    print(json.dumps(report(trace.variants())))
""")


def test_tokenwise_training_kernels_compile_without_spills():
    """The token-wise backward kernels (and the forward storing GELU's input) in bf16/fp16/fp32/
    fp32-tf32 at Base's shapes, for sm_80 and sm_90: no spill, shared memory within the limit,
    tensor cores for the GEMMs unless IEEE fp32."""
    backward = _compile_script(_TOKENWISE_BACKWARD_SCRIPT, timeout=900)
    assert {row["kernel"] for row in backward["variants"]} == {
        "_prefix_linear_kernel", "_prefix_linear_grad_rows_kernel", "_prefix_linear_dweight_kernel",
        "_epilogue_backward_kernel", "_layer_norm_backward_kernel"}
    assert any(row["constexprs"]["STORE_PRE"] for row in backward["variants"]
               if row["kernel"] == "_prefix_linear_kernel")
    _assert_compiles_cleanly(backward,
                             dot_kernels=("_prefix_linear_kernel", "_prefix_linear_dweight_kernel"))
