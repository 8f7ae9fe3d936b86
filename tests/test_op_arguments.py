"""Arguments no layout makes right are refused by each op's front end, before any backend runs:
a ValueError (TypeError for a non-tensor) naming the argument, the same for every backend (the
cuda backend's checks run here too, without a GPU: the front end raises before dispatch)."""
import pytest
import torch

import recvit_kernels as rk

BACKENDS = ["eager", "triton", "cuda"]


def mlp_args(**changes):
    args = dict(x=torch.randn(5, 8), fc1_weight=torch.randn(12, 8), fc1_bias=torch.randn(12),
                fc2_weight=torch.randn(8, 12), fc2_bias=torch.randn(8), residual=torch.randn(5, 8))
    args.update(changes)
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("changes,match", [
    # a short bias was read past its end by the triton epilogue
    (dict(fc1_bias=torch.randn(3)), r"fc1_bias: expected \(12,\)"),
    (dict(fc2_bias=torch.randn(8, 1)), "fc2_bias: expected 1 dimensions"),
    (dict(fc2_bias=torch.randn(8, device="meta")), "fc2_bias: expected device cpu"),
    (dict(fc1_bias=torch.arange(12)), "fc1_bias: expected a floating dtype"),
    (dict(residual=torch.randn(5, 8, device="meta")), "residual: expected device cpu"),
    (dict(x=torch.ones(5, 8, dtype=torch.int32)), "x: expected a floating dtype"),
    (dict(fc2_weight=torch.ones(8, 12, dtype=torch.int64)), "fc2_weight: expected a floating dtype"),
])
def test_mlp_refuses(backend, changes, match):
    with pytest.raises(ValueError, match=match):
        rk.mlp(**mlp_args(**changes), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("changes,match", [
    (dict(residual=torch.randn(4, 16, device="meta")), "residual: expected device cpu"),
    (dict(residual=[[0.0] * 16] * 4), "residual: expected a torch.Tensor"),
    (dict(x=torch.ones(4, 16, dtype=torch.int64)), "x: expected a floating dtype"),
    (dict(weight=torch.ones(16, dtype=torch.int32)), "weight: expected a floating dtype"),
    (dict(bias=torch.ones(16, dtype=torch.bool)), "bias: expected a floating dtype"),
    (dict(eps=-1e-5), "eps: expected a number >= 0"),  # a constant row: rsqrt(-1e-5), NaN
    (dict(eps=float("nan")), "eps: expected a number >= 0"),
])
def test_layer_norm_refuses(backend, changes, match):
    args = dict(x=torch.randn(4, 16), weight=torch.randn(16), bias=torch.randn(16), eps=1e-6, residual=None)
    args.update(changes)
    error = TypeError if "torch.Tensor" in match else ValueError
    with pytest.raises(error, match=match):
        rk.layer_norm(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention_refuses_a_bool_bound(backend):
    q = torch.randn(4, 1, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_k: expected a positive host int, got True"):
        rk.varlen_attention(q, q, q, cu, cu, 4, True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("depths,num_steps,match", [
    (torch.full((2, 3), 1.5), 4, "depths: expected an integer dtype"),  # was truncated to 1
    (torch.ones(2, 3, dtype=torch.bool), 4, "depths: expected an integer dtype"),
    (torch.full((2, 3), 5), 4, r"depths: values must lie in 1\.\.4"),
    (torch.zeros(2, 3, dtype=torch.int32), 4, r"depths: values must lie in 1\.\.4"),
    (torch.ones(2, 3), 2.0, "num_steps: expected an int"),
    (torch.ones(2, 3, dtype=torch.int64), True, "num_steps: expected an int"),
])
def test_depth_sort_refuses(backend, depths, num_steps, match):
    with pytest.raises(ValueError, match=match):
        rk.depth_sort(depths, num_steps, backend=backend)


def test_pack_and_unpack_refuse_tensors_of_another_layout():
    layout = rk.depth_sort(torch.randint(1, 4, (2, 5)), 3)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 5, C\) for this layout, got \(5, 2, 4\)"):
        rk.pack(torch.randn(5, 2, 4), layout)
    with pytest.raises(ValueError, match="x: expected 3 dimensions"):
        rk.pack(torch.randn(10, 4), layout)  # reshaped silently before
    with pytest.raises(ValueError, match="x: expected device cpu"):
        rk.pack(torch.randn(2, 5, 4, device="meta"), layout)
    with pytest.raises(ValueError, match=r"rows: expected shape \(10, C\) for this layout, got \(9, 4\)"):
        rk.unpack(torch.randn(9, 4), layout)



def linear_args(**changes):
    args = dict(x=torch.randn(5, 8), weight=torch.randn(8, 8), bias=torch.randn(8), num_rows=torch.tensor([3]),
                activation="gelu", residual=torch.randn(5, 8))
    args.update(changes)
    return args


def sharing_one_element(tensor, rows, cols):
    """(a copy of ``tensor``, a (rows, cols) ``out``) in one buffer: the copy's last element is out's first."""
    buffer = torch.randn(tensor.numel() + rows * cols - 1)
    return buffer[:tensor.numel()].view(tensor.shape).copy_(tensor), buffer[tensor.numel() - 1:].view(rows, cols)


def overlapping_outs(args):
    """(changes, the input named) giving ``out`` memory shared with one float input, by one element, and
    with ``num_rows`` or a transposed residual, for ``args`` of an op writing a (5, 8) ``out``."""
    cases = []
    for name, tensor in args.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            copy, out = sharing_one_element(tensor, 5, 8)
            cases.append((dict({name: copy}, out=out), name))
    out = torch.randn(5, 8)
    if "num_rows" in args:  # an int32 view of out's last element
        cases.append((dict(num_rows=out.view(torch.int32)[4, 7:], out=out), "num_rows"))
    transposed = torch.randn(8, 5)  # the residual's elements, laid out otherwise than out's
    cases.append((dict(residual=transposed.t(), out=transposed.view(5, 8)), "residual"))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,make_args", [(rk.prefix_linear, linear_args), (rk.mlp, mlp_args)])
def test_out_overlapping_an_input_is_refused(backend, op, make_args):
    """An ``out`` sharing memory with a tensor the op reads (on a GPU programs would overwrite what
    others still read; the interpreter runs them in order, which hid it), or with itself: refused
    before any work, on every op that takes ``out``."""
    args = make_args()
    for changes, name in overlapping_outs(args):
        with torch.no_grad(), pytest.raises(ValueError, match=f"out: overlaps {name},"):
            op(**{**args, **changes}, backend=backend)
    with torch.no_grad(), pytest.raises(ValueError, match="out: its rows overlap one another"):
        op(**args, out=torch.randn(8).expand(5, 8), backend=backend)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("op,make_args", [(rk.prefix_linear, linear_args), (rk.mlp, mlp_args)])
@pytest.mark.parametrize("into", ["residual", "a view of the residual", "rows beside the inputs"])
def test_out_may_be_the_residual_or_beside_the_inputs(backend, op, make_args, into):
    """``out`` the residual itself (the tensor, or another view of its elements), or rows of one
    buffer beside the inputs' rows: written in place with the values of a new result."""
    buffer = torch.randn(15, 8)
    args = make_args(x=buffer[:5], residual=buffer[5:10])
    if "num_rows" in args:
        args["num_rows"] = torch.tensor([5])  # every row: a new result's rows past the count are zero
    expected = op(**args, backend="eager")
    out = {"residual": args["residual"], "a view of the residual": buffer[5:10],
           "rows beside the inputs": buffer[10:]}[into]
    with torch.no_grad():
        op(**args, out=out, backend=backend)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention_refuses_a_query_row_named_twice(backend):
    """q_rows naming one row at two read positions (in two segments, or twice in one): two queries
    would write one output row (two programs racing on a GPU; eager kept the last copy but summed
    both into dq, triton kept one dq), so it is refused where values are checkable. Positions past a
    used length or past max_seqlen_q are not read and may repeat."""
    q = torch.randn(6, 2, 16)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    for rows, repeated in (([0, 1, 2, 3, 0, 5], 0), ([0, 1, 1, 3, 4, 5], 1)):
        with pytest.raises(ValueError, match=f"q_rows: names row {repeated} at two read positions"):
            rk.varlen_attention(q, q, q, cu, cu, 3, 3, q_rows=torch.tensor(rows), backend=backend)
    unread = dict(q_rows=torch.tensor([0, 1, 2, 3, 4, 2]), seqused_q=torch.tensor([3, 2], dtype=torch.int32))
    clipped = dict(q_rows=torch.tensor([0, 1, 2, 3, 4, 0]))
    for tables, max_q in ((unread, 3), (clipped, 2)):
        try:
            rk.varlen_attention(q, q, q, cu, cu, max_q, 3, **tables, backend=backend)
        except RuntimeError as error:  # this machine cannot run the backend (cuda): not the check
            assert "cannot run this call" in str(error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_sharing_the_residuals_address_in_another_dtype_is_refused(backend):
    """mlp's residual may have another dtype than x (and out): an fp32 ``out`` at the address,
    shape and strides of an fp64 residual is not the residual itself (out's row r is written over
    the bytes of residual's row r/2, which other programs still read), so it is refused."""
    args = mlp_args(residual=torch.randn(5, 8, dtype=torch.float64))
    out = torch.empty(0).set_(args["residual"].untyped_storage(), 0, (5, 8), (8, 1))
    assert out.data_ptr() == args["residual"].data_ptr() and out.stride() == args["residual"].stride()
    with torch.no_grad(), pytest.raises(ValueError, match="out: overlaps residual,"):
        rk.mlp(**args, out=out, backend=backend)


@pytest.mark.parametrize("op,make_args", [(rk.prefix_linear, linear_args), (rk.mlp, mlp_args)])
def test_out_overlapping_an_input_of_another_storage_is_refused(op, make_args):
    """Two storages may share memory (two tensors made from overlapping slices of one NumPy array,
    or of one DLPack buffer): an ``out`` whose first element is x's last is refused all the same."""
    buffer = torch.randn(5 * 8 + 5 * 8 - 1).numpy()
    x, out = torch.from_numpy(buffer[:40]).view(5, 8), torch.from_numpy(buffer[39:]).view(5, 8)
    assert x.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()
    with torch.no_grad(), pytest.raises(ValueError, match="out: overlaps x,"):
        op(**make_args(x=x), out=out, backend="eager")
