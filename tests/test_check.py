"""`recvit check` on the CPU: the quick run passes, and a broken op is reported as a failure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recvit import cli
from recvit_kernels._backend import _IMPLEMENTATIONS

ROOT = Path(__file__).resolve().parents[1]


def triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def test_quick_check_passes_on_cpu(tmp_path):
    """The command as CI runs it, in a fresh process without TRITON_INTERPRET set: it sets it."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    report = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "-m", "recvit", "check", "--quick", "--device", "cpu",
                             "--json", str(report)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " 0 failed" in result.stdout
    data = json.loads(report.read_text())
    assert data["passed"] and data["device"] == "cpu"
    rows = data["checks"]
    assert all(row["status"] == "pass" for row in rows)
    ran = {(row["check"], row["backend"]) for row in rows}
    assert {("depth_sort", "eager"), ("pack/unpack", "eager"), ("model", "packed"),
            ("model sync-free", "packed")} <= ran
    if triton_importable():
        assert data["triton_interpreter"]
        assert {(op, "triton") for op in ("varlen_attention", "layer_norm", "layer_norm+residual", "mlp",
                                          "prefix_linear", "model", "model sync-free")} <= ran


def _perturbed(implementation):
    """The op off by one part in a thousand: small, but far past the tolerance."""
    def broken(*args, **kwargs):
        out = implementation(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * 1.001,) + out[1:]
        return out * 1.001
    return broken


def _swapped_sort(implementation):
    """A depth sort whose first two rows trade places."""
    def broken(depths, num_steps):
        layout = implementation(depths, num_steps)
        layout.perm = layout.perm.clone()
        layout.perm[[0, 1]] = layout.perm[[1, 0]]
        return layout
    return broken


@pytest.mark.parametrize("op,backend,breaker,only,failing", [
    ("depth_sort", "eager", _swapped_sort, ["depth_sort"], {("depth_sort", "eager")}),
    ("layer_norm", "triton", _perturbed, ["layer_norm", "--backends", "triton"],
     {("layer_norm", "triton"), ("layer_norm+residual", "triton")}),
    ("layer_norm", "packed", _perturbed, ["model sync-free", "--backends", "packed"],
     {("model sync-free", "packed")}),
])
def test_a_broken_op_fails_the_check(monkeypatch, capsys, tmp_path, op, backend, breaker, only, failing):
    if backend == "triton" and not triton_importable():
        pytest.skip("triton is not installed")
    import recvit_kernels as rk

    rk.available_backends()  # loads the triton backend, so that its registration is what we break
    monkeypatch.setitem(_IMPLEMENTATIONS[op], backend, breaker(_IMPLEMENTATIONS[op][backend]))
    if op == "depth_sort" and triton_importable():
        failing = failing | {("depth_sort", "triton")}  # triton's sort, eager's code, is checked against it
    report = tmp_path / "check.json"
    code = cli.main(["check", "--quick", "--device", "cpu", "--json", str(report), "--only", *only])
    out = capsys.readouterr().out
    assert code == 1, out
    rows = json.loads(report.read_text())["checks"]
    failed = {(row["check"], row["backend"]) for row in rows if row["status"] == "FAIL"}
    assert failed == failing, out
    assert all(row["status"] == "pass" for row in rows if (row["check"], row["backend"]) not in failing)
    assert "FAILED: " + sorted(failing)[0][0] in out


def _broken_in_form(keyword):
    """A breaker: the op off by one part in a hundred (past fp16 attention's bound too) only when
    called with ``keyword`` (the form the model uses); with ``out`` the values written in place are
    the ones off."""
    def breaker(implementation):
        def broken(*args, **kwargs):
            out = implementation(*args, **kwargs)
            if kwargs.get(keyword) is None:
                return out
            if keyword == "out":
                return kwargs["out"].mul_(1.01)
            return (out[0] * 1.01,) + out[1:] if isinstance(out, tuple) else out * 1.01
        return broken
    return breaker


@pytest.mark.parametrize("op,keyword,form", [
    ("varlen_attention", "seqused_q", "seqused"),  # one image_order table with seqused_q/k
    ("layer_norm", "num_rows", "num_rows"),        # the live rows only
    ("prefix_linear", "out", "out="),              # fc2's epilogue, in place
])
def test_the_models_forms_are_checked(monkeypatch, tmp_path, capsys, op, keyword, form):
    """An op broken only in the form the model calls it fails exactly that form's rows."""
    if not triton_importable():
        pytest.skip("triton is not installed")
    import recvit_kernels as rk

    rk.available_backends()
    monkeypatch.setitem(_IMPLEMENTATIONS[op], "triton", _broken_in_form(keyword)(_IMPLEMENTATIONS[op]["triton"]))
    report = tmp_path / "check.json"
    code = cli.main(["check", "--quick", "--device", "cpu", "--json", str(report), "--only", op,
                     "--backends", "triton"])
    out = capsys.readouterr().out
    rows = json.loads(report.read_text())["checks"]
    in_form = [form in row["case"] for row in rows]
    assert code == 1 and any(in_form) and not all(in_form), out
    assert [row["status"] == "FAIL" for row in rows] == in_form, out


def test_dtypes_narrows_the_check(tmp_path, capsys):
    """--dtypes: the floating-point checks run in the dtypes named only (gpu_run.sh first checks bf16)."""
    if not triton_importable():
        pytest.skip("triton is not installed")
    report = tmp_path / "check.json"
    code = cli.main(["check", "--quick", "--device", "cpu", "--json", str(report), "--dtypes", "fp16",
                     "--only", "depth_sort", "layer_norm", "--backends", "triton"])
    rows = json.loads(report.read_text())["checks"]
    out = capsys.readouterr().out
    assert code == 0, out
    assert {row["dtype"] for row in rows if row["check"] == "layer_norm"} == {"float16"}, out
    assert any(row["check"] == "depth_sort" for row in rows)  # dtype-free: runs in any case


def test_check_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", "--only", "nonsense"])
    assert "argument --only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["check", "--dtypes", "fp8"])
    assert "argument --dtypes" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.main(["check", "--device", "cuda"])
        assert "argument --device: cuda requested" in capsys.readouterr().err


def _spreading(implementation):
    """A varlen attention whose every output row picks up 0 x (row 0 of q): a NaN there spreads to
    every image, as the eager op's padding once did."""
    def broken(q, *args, **kwargs):
        return implementation(q, *args, **kwargs) + 0 * q[0]
    return broken


@pytest.mark.parametrize("broken", [False, True], ids=["as-is", "spreading-attention"])
def test_non_finite_input_is_reported(monkeypatch, tmp_path, capsys, broken):
    """The 'non-finite input' rows: a NaN pixel in image 0 leaves the others as a clean run's
    (noted: image 0's logits are NaN, nothing raised); an attention that spreads it fails them."""
    if broken:
        monkeypatch.setitem(_IMPLEMENTATIONS["varlen_attention"], "packed",
                            _spreading(_IMPLEMENTATIONS["varlen_attention"]["packed"]))
    report = tmp_path / "check.json"
    code = cli.main(["check", "--quick", "--device", "cpu", "--json", str(report), "--only", "non-finite",
                     "--backends", "packed"])
    out = capsys.readouterr().out
    assert "Non-finite input: not checked for" in out
    rows = json.loads(report.read_text())["checks"]
    assert [row["case"] for row in rows] == ["Tiny-112px b=4 kv=active", "Tiny-112px b=4 kv=all"], out
    assert all(row["check"] == "non-finite input" and row["backend"] == "packed" for row in rows)
    assert all("image 0's logits: NaN (not checked, not raised)" in row["note"] for row in rows)
    assert code == int(broken) and {row["status"] for row in rows} == {"FAIL" if broken else "pass"}, out


def test_a_call_handed_on_is_noted(monkeypatch):
    """backend="cuda" hands a call its kernels decline to the next backend: an op row is a skip
    saying where it ran, a model row keeps its result with the same note (simulated on the CPU:
    cuda marked available, its device check passed)."""
    import recvit_kernels as rk
    from recvit import check
    from recvit_kernels import _backend
    from recvit_kernels.cuda import varlen_attention as cuda_attention

    rk.available_backends()
    monkeypatch.setitem(_backend._AVAILABILITY, "cuda", lambda: None)
    monkeypatch.setitem(_backend._AVAILABILITY, "triton", lambda: "not here")
    monkeypatch.setattr(cuda_attention, "device_reason", lambda name, tensor: None)
    q, cu = torch.randn(6, 2, 32), torch.tensor([0, 2, 6], dtype=torch.int32)
    assert check._distinct("varlen_attention", ["eager", "packed", "cuda"], (q, q, q, cu, cu, 4, 4, 0.1)) \
        == ["eager", "cuda"]
    checker = check._Checker("cpu", None, lambda result: None)

    def body():
        rk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="cuda")
        return 0.0, 1.0, 0.1

    checker.run("varlen_attention", "cuda", "float32", "op", body)
    checker.run("model", "cuda", "float32", "model", body)
    note = ("cuda declined: varlen_attention on packed (q has dtype torch.float32; the cuda attention "
            "takes float16 and bfloat16)")
    assert [(r.status, r.note) for r in checker.results] == [("skip", note), ("pass", note)]
