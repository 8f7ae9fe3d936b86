"""DepthAdaptiveBlocks: L distinct layers with per-token depth (early exit), on every backend.

The eager masked reference is first checked against a by-hand loop (block l on the tokens of depth
>= l, attention among them or over all tokens); every kernel path (packed, triton, triton's
sync-free static path) then equals the eager reference, outputs and gradients, on random and edge
depth profiles in both kv modes. RecursiveBlock is the special case [head, shared x (L-2), tail].
"""
import pytest
import torch
import torch.nn as nn

import recvit
import recvit_kernels as rk
from deit_reference import Block as ReferenceBlock
from recvit.models.layers import Block
from test_ops import PROFILES, random_depths

DIM, HEADS, STEPS, TOKENS = 64, 2, 4, 17  # head_dim 32 (the triton tiles' minimum)
PATHS = [("packed", False), ("triton", False), ("triton", True)]


def blocks(num_steps=STEPS, **kwargs):
    return recvit.DepthAdaptiveBlocks([Block(DIM, HEADS) for _ in range(num_steps)], **kwargs)


def by_hand(module, x, depths, kv):
    """Per image: block l updates the tokens of depth >= l, attending to them (kv="active") or to
    every token (kv="all", exited ones with their frozen states)."""
    out = x.clone()
    for image in range(x.shape[0]):
        state = x[image]
        for step in range(1, module.num_steps + 1):
            active = (depths[image] >= step).nonzero()[:, 0]
            if active.numel() == 0:
                break
            layer = module[step - 1]
            if kv == "active":
                state = state.index_copy(0, active, layer(state[None, active])[0])
            else:
                state = state.index_copy(0, active, layer(state[None])[0, active])
        out[image] = state
    return out


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", PROFILES)
def test_eager_reference_is_the_definition(profile, kv):
    module = blocks()
    x, depths = torch.randn(3, TOKENS, DIM), random_depths(3, TOKENS, STEPS, profile)
    with torch.no_grad():
        torch.testing.assert_close(module(x, depths, kv=kv, backend="eager"), by_hand(module, x, depths, kv),
                                   atol=1e-5, rtol=1e-5)


def run(module, x, depths, kv, backend, static_shapes):
    module.static_shapes = static_shapes
    try:
        return module(x, depths, kv=kv, backend=backend)
    finally:
        module.static_shapes = False


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend,static_shapes", PATHS, ids=["packed", "triton", "triton-static"])
@pytest.mark.parametrize("batch", [1, 3])
def test_backends_equal_eager(batch, backend, static_shapes, profile, kv):
    if rk.unavailable_reason(backend) is not None:
        pytest.skip(f"{backend} backend unavailable: {rk.unavailable_reason(backend)}")
    module = blocks().eval()
    x, depths = torch.randn(batch, TOKENS, DIM), random_depths(batch, TOKENS, STEPS, profile)
    with torch.no_grad():
        expected = module(x, depths, kv=kv, backend="eager")
        out = run(module, x, depths, kv, backend, static_shapes)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def gradients(module, x, depths, kv, backend, static_shapes):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = run(module, x, depths, kv, backend, static_shapes)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend,static_shapes", PATHS, ids=["packed", "triton", "triton-static"])
def test_gradients_equal_eager(backend, static_shapes, profile, kv):
    """The input's gradient and every parameter's (a block no token reaches gets none on any path)."""
    if rk.unavailable_reason(backend) is not None:
        pytest.skip(f"{backend} backend unavailable: {rk.unavailable_reason(backend)}")
    module = blocks().train()
    x, depths = torch.randn(2, TOKENS, DIM), random_depths(2, TOKENS, STEPS, profile)
    out, x_grad, grads = gradients(module, x, depths, kv, backend, static_shapes)
    out_ref, x_grad_ref, grads_ref = gradients(module, x, depths, kv, "eager", False)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_grad, x_grad_ref, atol=1e-5, rtol=1e-4)
    deepest = int(depths.max())
    reached = {name for name in grads_ref if int(name.split(".")[0]) < deepest}
    assert set(grads_ref) >= reached and all(
        float(g.abs().max()) == 0 for n, g in grads_ref.items() if n not in reached)
    for name in reached:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["eager", "packed", "triton"])
def test_single_block_and_one_token(backend):
    """L = 1 (every token runs the one block) and a one-token image."""
    module = blocks(num_steps=1).eval()
    for shape in ((2, TOKENS), (1, 1)):
        x = torch.randn(*shape, DIM)
        with torch.no_grad():
            torch.testing.assert_close(module(x, torch.ones(shape, dtype=torch.long), backend=backend),
                                       module[0](x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "packed"])
def test_recursive_block_is_the_head_shared_tail_case(backend):
    """A RecursiveBlock equals DepthAdaptiveBlocks over [head, shared x (L-2), tail]."""
    recursive = recvit.RecursiveBlock(DIM, HEADS, num_steps=5).eval()
    layers = [recursive.layer_for_step(step) for step in range(1, 6)]
    unrolled = recvit.DepthAdaptiveBlocks(layers).eval()
    assert unrolled[1] is unrolled[3] is recursive.shared_layer  # shared, not copied
    x, depths = torch.randn(2, TOKENS, DIM), random_depths(2, TOKENS, 5)
    for kv in ("active", "all"):
        with torch.no_grad():
            assert torch.equal(unrolled(x, depths, kv=kv, backend=backend),
                               recursive(x, depths, kv=kv, backend=backend))


def test_timm_style_blocks_are_copied():
    """timm-style blocks become recvit Blocks with the same weights (the originals untouched); at
    depth L every token runs them all, as the plain sequence does."""
    source = nn.Sequential(*[ReferenceBlock(DIM, HEADS) for _ in range(3)])
    module = recvit.DepthAdaptiveBlocks(source)
    assert list(module.state_dict()) == list(source.state_dict())
    assert all(isinstance(layer, Block) and layer is not original for layer, original in zip(module, source))
    x = torch.randn(2, TOKENS, DIM)
    with torch.no_grad():
        for backend in ("eager", "packed"):
            torch.testing.assert_close(module(x, torch.full((2, TOKENS), 3), backend=backend), source(x),
                                       atol=1e-5, rtol=1e-5)


class _LayerScaleBlock(ReferenceBlock):
    def __init__(self):
        super().__init__(DIM, HEADS)
        self.ls1 = nn.Parameter(torch.ones(DIM))


@pytest.mark.parametrize("given,error,match", [
    ([], ValueError, "blocks: expected at least one block"),
    ([Block(DIM, HEADS), Block(32, HEADS)], ValueError, r"blocks: expected blocks of one width"),
    ([nn.Linear(4, 4)], TypeError, r"blocks\[0\]: expected a timm-style block"),
    (Block(DIM, HEADS), TypeError, "blocks: expected a sequence of blocks, got Block"),
    (3, TypeError, "blocks: expected a sequence of blocks, got int"),
    ([Block(DIM, HEADS), _LayerScaleBlock()], ValueError, r"blocks\[1\]: .*layer scale.*\['ls1'\]"),
])
def test_bad_blocks(given, error, match):
    with pytest.raises(error, match=match):
        recvit.DepthAdaptiveBlocks(given)


def test_bad_depths():
    module = blocks()
    with pytest.raises(ValueError, match=r"depths: values must lie in 1\.\.4"):
        module(torch.randn(1, 5, DIM), torch.full((1, 5), 5))
    with pytest.raises(ValueError, match="x: expected shape"):
        module(torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("static_shapes", [False, True])
def test_cuda_equals_eager(static_shapes, kv):
    assert rk.unavailable_reason("cuda") is None, rk.unavailable_reason("cuda")
    module = blocks(num_steps=12).cuda().eval()
    x, depths = torch.randn(3, 197, DIM, device="cuda"), random_depths(3, 197, 12).cuda()
    with torch.no_grad():
        expected = module(x, depths, kv=kv, backend="eager")
        out = run(module, x, depths, kv, "cuda", static_shapes)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
