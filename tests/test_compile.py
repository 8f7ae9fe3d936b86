"""torch.compile and torch.export of the recvit models on the CPU, and ``torch.library.opcheck`` of the
triton backend's custom ops (``torch.ops.recvit.*``, run by the Triton interpreter here).

While tracing, the models take the sync-free static path and skip the host value checks, so a
whole forward is one graph; the triton backend's kernels are opaque custom ops in it. Most tests
compile with ``aot_eager`` (AOTAutograd's graphs run eagerly: the tracing without inductor's code
generation); one compiles with inductor.
"""
import re

import pytest
import torch

import recvit
import recvit_kernels as rk

TRITON = rk.unavailable_reason("triton")
needs_triton = pytest.mark.skipif(TRITON is not None, reason=f"triton backend unavailable: {TRITON}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: dynamo's caches, and its limit of 8 recompiles of one code
    object, last the whole process, and this file compiles the same forward for many models."""
    import torch._dynamo

    torch._dynamo.reset()
    yield


def tiny(name="edge_recvit_tiny", **settings):
    """A Tiny model at 32 px, patch 8 (17 tokens), 4 recursion steps, 10 classes, fixed weights."""
    torch.manual_seed(0)
    return recvit.create_model(name, img_size=32, patch_size=8, num_steps=4, num_classes=10, **settings)


def images(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_outputs_close(actual, expected):
    """Logits, features (after the final norm, O(1)) and depths of two ``return_aux`` outputs."""
    torch.testing.assert_close(actual.depths, expected.depths)
    torch.testing.assert_close(actual.features, expected.features)
    torch.testing.assert_close(actual.logits, expected.logits)


def test_tiny_model_exits_tokens_early():
    """The compile tests below mean something only if tokens leave at different steps."""
    with torch.no_grad():
        depths = tiny()(images(), return_aux=True).depths
    assert set(depths[:, 1:].unique().tolist()) == {1, 2, 3, 4}


@pytest.mark.parametrize("kv", ["active", "all"])
def test_compiled_packed_model_equals_eager_in_one_graph(kv):
    model = tiny(kv=kv, backend="packed").eval()
    x = images()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x, return_aux=True)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
            [b.reason for b in explanation.break_reasons]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_outputs_close(compiled(x, return_aux=True), model(x, return_aux=True))
        other = images(3)  # a second batch size recompiles with a dynamic batch dimension
        assert_outputs_close(compiled(other, return_aux=True), model(other, return_aux=True))


def _loss_and_grads(model, forward, x):
    model.zero_grad()
    out = forward(x, return_aux=True)
    loss = recvit.EdgeRecViTLoss()(out, torch.tensor([3, 7])).total
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_training_matches_eager(model):
    x = images()
    expected_loss, expected = _loss_and_grads(model, model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = _loss_and_grads(model, compiled, x)
    torch.testing.assert_close(loss, expected_loss)
    assert grads.keys() == expected.keys() and "ranker.fc1.weight" in grads
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], msg=lambda m, name=name: f"{name}: {m}")


def test_compiled_packed_training_gives_eager_gradients():
    _assert_training_matches_eager(tiny(backend="packed").train())


@needs_triton
@pytest.mark.parametrize("kv", ["active", "all"])
def test_compiled_triton_model_equals_eager_in_one_graph(kv):
    """The kernels are opaque custom ops: fullgraph traces through, inference writes in place."""
    model = tiny(kv=kv, backend="triton").eval()
    x = images()
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_outputs_close(compiled(x, return_aux=True), model(x, return_aux=True))


@needs_triton
def test_compiled_triton_training_gives_eager_gradients():
    _assert_training_matches_eager(tiny(backend="triton").train())


@pytest.mark.parametrize("backend", ["packed", pytest.param("triton", marks=needs_triton)])
def test_compiled_early_exit_deit_equals_eager_and_trains(backend):
    """The early-exit DeiT (L distinct blocks) in one graph too: inference, then the loss's gradients."""
    model = tiny("deit_tiny_early_exit", backend=backend).eval()
    x = images()
    with torch.no_grad():
        assert model(x, return_aux=True).depths[:, 1:].unique().numel() > 1
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_outputs_close(compiled(x, return_aux=True), model(x, return_aux=True))
    _assert_training_matches_eager(model.train())


@needs_triton
def test_inductor_compiles_the_triton_model():
    """A real inductor compile (C++ for the PyTorch parts around the opaque kernels): ~25 s cold."""
    model = tiny(backend="triton").eval()
    x = images()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        assert_outputs_close(compiled(x, return_aux=True), model(x, return_aux=True))


@needs_triton
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_export_sees_the_custom_ops(grad):
    model = tiny(backend="triton").eval()
    x, other = images(), images(3)
    with torch.set_grad_enabled(grad):
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(model, (x,), dynamic_shapes={"images": {0: batch}})
        ops = set(re.findall(r"recvit\.(\w+)", program.graph_module.code))
        expected = {"layer_norm_triton", "prefix_linear_triton", "varlen_attention_triton"}
        # inference writes each step's last GEMM into the row buffer in place
        assert ops == (expected if grad else expected | {"prefix_linear_triton_"})
        for batch in (x, other):
            torch.testing.assert_close(program.module()(batch), model(batch))


class _CustomOpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """The ``recvit::`` custom ops called under it (each runs for real)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "recvit":
            self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@needs_triton
def test_eager_calls_skip_the_custom_ops_unless_autograd_records():
    """``call_op``: eager inference and the eager backward call the functions the custom ops wrap
    (no op dispatch); a forward that autograd records goes through the forward ops."""
    model, x = tiny(backend="triton"), images()
    with _CustomOpCalls() as calls, torch.no_grad():
        model.eval()(x)
    assert calls.ops == set()
    with _CustomOpCalls() as calls:
        logits = model.train()(x)
    assert {"layer_norm_triton", "linear_epilogue_triton", "varlen_attention_triton"} <= calls.ops, calls.ops
    with _CustomOpCalls() as calls:
        logits.sum().backward()
    assert not {op for op in calls.ops if op.endswith("backward_triton")}, calls.ops


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_compiled_mor_vit_equals_eager_in_one_graph(routing):
    model = tiny("mor_vit_tiny", routing=routing, backend="packed").eval()
    x = images()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
            [b.reason for b in explanation.break_reasons]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_outputs_close(compiled(x, return_aux=True), model(x, return_aux=True))


@pytest.mark.parametrize("backend", ["packed", pytest.param("triton", marks=needs_triton)])
def test_fake_tensors_propagate_shapes(backend):
    """Under a FakeTensorMode nothing is computed or read back: the forward gives the shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = tiny(backend=backend).eval()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        out = model(torch.empty(2, 3, 32, 32), return_aux=True)
    assert (out.logits.shape, out.features.shape) == ((2, 10), (2, 17, 192))


def test_meta_model_propagates_shapes():
    with torch.device("meta"):
        logits = tiny(backend="packed").eval()(torch.empty(2, 3, 32, 32))
    assert logits.shape == (2, 10) and logits.is_meta


def test_value_checks_still_run_in_eager():
    """Tracing skips the host value checks; an eager call still refuses bad depths."""
    model = tiny(backend="packed").eval()
    depths = torch.full((2, 17), 5)
    with pytest.raises(ValueError, match="depths"):
        model(images(), depths=depths)


# ------------------------------------------------------------------------------------------------
# opcheck: schema (mutation and aliasing), fake implementation, autograd registration, and
# AOTAutograd with dynamic shapes against eager (values and gradients), on small fp32 inputs.

# Forms whose outputs leave some rows unspecified (never written, so the values differ from run to
# run): everything but the comparison of values.
WITHOUT_VALUES = ("test_schema", "test_autograd_registration", "test_faketensor")
WITH_VALUES = WITHOUT_VALUES + ("test_aot_dispatch_dynamic",)  # opcheck's default


def _randn(*shape, grad=False):
    return torch.randn(*shape).requires_grad_(grad)


@needs_triton
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("num_rows", [None, 7])
def test_opcheck_layer_norm(residual, num_rows):
    x = _randn(10, 32, grad=True)
    args = (x, _randn(32, grad=True), _randn(32, grad=True), 1e-6,
            _randn(10, 32, grad=True) if residual else None,
            None if num_rows is None else torch.tensor([num_rows]), True)
    torch.library.opcheck(torch.ops.recvit.layer_norm_triton.default, args)


@needs_triton
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_prefix_linear(activation, residual):
    """With GELU the op also returns GELU's input (for the backward), unspecified past the live
    rows: its values and gradients are compared with every row live."""
    def args(live):
        return (_randn(40, 32, grad=True), _randn(48, 32, grad=True), _randn(48, grad=True),
                torch.tensor([live]), activation, _randn(40, 48, grad=True) if residual else None, True)

    op = torch.ops.recvit.prefix_linear_triton.default
    torch.library.opcheck(op, args(29), test_utils=WITHOUT_VALUES if activation == "gelu" else WITH_VALUES)
    if activation == "gelu":
        torch.library.opcheck(op, args(40))


@needs_triton
@pytest.mark.parametrize("into_residual", [False, True])
def test_opcheck_prefix_linear_in_place(into_residual):
    """The model's fc2: the live rows written into the row buffer, its other rows kept (or into
    the residual itself, which the contract allows)."""
    residual = _randn(40, 32)
    args = (_randn(40, 64), _randn(32, 64), _randn(32), torch.tensor([29]), None, residual,
            residual if into_residual else _randn(40, 32))
    torch.library.opcheck(torch.ops.recvit.prefix_linear_triton_.default, args)


@needs_triton
@pytest.mark.parametrize("gelu", [False, True])
def test_opcheck_linear_epilogue(gelu):
    residual = None if gelu else _randn(12, 40, grad=True)
    args = (_randn(12, 40, grad=True), _randn(40, grad=True), residual, gelu)
    torch.library.opcheck(torch.ops.recvit.linear_epilogue_triton.default, args)
    torch.library.opcheck(torch.ops.recvit.linear_epilogue_triton_.default,
                          tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
                          + (_randn(12, 40),))



@needs_triton
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("num_rows", [None, 7])
def test_opcheck_layer_norm_backward(residual, num_rows):
    args = (_randn(10, 32), _randn(10, 32) if residual else None, _randn(10, 32), _randn(32), 1e-6,
            None if num_rows is None else torch.tensor([num_rows]))
    torch.library.opcheck(torch.ops.recvit.layer_norm_backward_triton.default, args)


@needs_triton
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)],
                         ids=["all", "x", "weight-residual"])
def test_opcheck_prefix_linear_backward(gelu, needs):
    """GELU's input is given at every row (the backward reads the live rows only)."""
    args = (_randn(40, 48), _randn(40, 32), _randn(48, 32), torch.tensor([29]),
            _randn(40, 48) if gelu else None, True, *needs)
    torch.library.opcheck(torch.ops.recvit.prefix_linear_backward_triton.default, args)


@needs_triton
@pytest.mark.parametrize("needs_bias", [False, True])
def test_opcheck_linear_epilogue_backward(needs_bias):
    args = (_randn(12, 40), _randn(12, 40), _randn(40), needs_bias)
    torch.library.opcheck(torch.ops.recvit.linear_epilogue_backward_triton.default, args)

def _attention_inputs(form, grad):
    """q, k, v (2 images x 6 rows, 2 heads, head_dim 16) and the tables of one ``form``: ``plain``
    segments, or the model's ``image_order`` table with starts b*N and used lengths (``active``:
    for queries and keys; ``all``: for queries only)."""
    tokens, heads, head_dim = 6, 2, 16
    q, k, v = (_randn(2 * tokens, heads, head_dim, grad=grad) for _ in range(3))
    if form == "plain":
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        return (q, k, v, cu, cu, 7, 7, head_dim ** -0.5, None, None, None, None)
    starts = torch.tensor([0, tokens, 2 * tokens], dtype=torch.int32)
    table = torch.randperm(2 * tokens, generator=torch.Generator().manual_seed(2))
    used = torch.tensor([4, 6], dtype=torch.int32)
    return (q, k, v, starts, starts, tokens, tokens, head_dim ** -0.5, table, table, used,
            used if form == "active" else None)


@needs_triton
@pytest.mark.parametrize("form", ["plain", "active", "all"])
@pytest.mark.parametrize("store_lse", [False, True], ids=["inference", "training"])
def test_opcheck_varlen_attention(form, store_lse):
    args = _attention_inputs(form, grad=store_lse) + (store_lse,)
    # with used lengths, the rows no used query covers (and their log-sum-exp) are unspecified
    full_coverage = form == "plain"
    torch.library.opcheck(torch.ops.recvit.varlen_attention_triton.default, args,
                          test_utils=WITH_VALUES if full_coverage else WITHOUT_VALUES)


@needs_triton
@pytest.mark.parametrize("form", ["plain", "active", "all"])
@pytest.mark.parametrize("needs_kv_grad", [False, True])
def test_opcheck_varlen_attention_backward(form, needs_kv_grad):
    q, k, v, *tables = _attention_inputs(form, grad=False)
    out, lse = torch.ops.recvit.varlen_attention_triton(q, k, v, *tables, True)
    args = (torch.randn_like(q), q, k, v, out, lse, *tables, needs_kv_grad)
    torch.library.opcheck(torch.ops.recvit.varlen_attention_backward_triton.default, args)


def test_cuda_custom_op_fakes_match_the_eager_ops():
    """The cuda kernels cannot run here: their custom ops' fake implementations (what torch.compile
    and torch.export trace) are checked against the shapes, dtypes and strides of the eager ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import recvit_kernels.cuda  # noqa: F401  (registers the ops, with or without the extension)

    x, residual, hidden = torch.randn(10, 32), torch.randn(10, 32), torch.randn(10, 64)
    weight, bias, fc1, fc1_bias = torch.randn(32), torch.randn(32), torch.randn(64, 32), torch.randn(64)
    fc2 = torch.randn(32, 64)
    rows, depths = torch.tensor([7]), torch.randint(1, 5, (2, 9))
    q = torch.randn(18, 2, 16)
    starts = torch.tensor([0, 9, 18], dtype=torch.int32)
    table, used = torch.randperm(18), torch.tensor([4, 9], dtype=torch.int32)
    layout = rk.depth_sort(depths, 4, backend="packed")
    ops = torch.ops.recvit
    cases = [
        (ops.layer_norm_cuda, (x, weight, bias, 1e-6, None, rows),
         [rk.layer_norm(x, weight, bias, num_rows=rows, backend="packed")]),
        (ops.layer_norm_cuda, (x, weight, bias, 1e-6, residual, None),
         list(rk.layer_norm(x, weight, bias, residual=residual, backend="packed"))),
        (ops.prefix_linear_cuda, (hidden, fc2, bias, rows, True, residual),
         rk.prefix_linear(hidden, fc2, bias, rows, "gelu", residual, backend="packed")),
        (ops.mlp_cuda, (x, fc1, fc1_bias, fc2, bias, residual),
         rk.mlp(x, fc1, fc1_bias, fc2, bias, residual, backend="packed")),
        (ops.varlen_attention_cuda, (q, q, q, starts, starts, 9, 9, 0.25, table, table, used, None),
         rk.varlen_attention(q, q, q, starts, starts, 9, 9, 0.25, q_rows=table, kv_rows=table,
                             seqused_q=used, backend="packed")),
        (ops.depth_sort_cuda, (depths, 4),
         [layout.perm, layout.inverse_perm, layout.step_rows, layout.image_lengths, layout.cu_seqlens,
          layout.image_order]),
    ]
    with FakeTensorMode(allow_non_fake_inputs=True):
        for op, args, expected in cases:
            faked = op(*args)
            faked, expected = (faked, expected) if isinstance(faked, list) else ([faked], [expected])
            assert [(t.shape, t.dtype, t.stride()) for t in faked] == \
                [(t.shape, t.dtype, t.stride()) for t in expected], op


def test_importing_recvit_loads_neither_dynamo_nor_triton():
    """The trace-time markers cost nothing at import: importing torch._dynamo takes over a second
    and imports triton, after which ``recvit check`` could no longer turn the interpreter on."""
    import os
    import subprocess
    import sys

    code = "import sys, recvit, recvit_kernels; print(sorted({'torch._dynamo', 'triton'} & set(sys.modules)))"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
