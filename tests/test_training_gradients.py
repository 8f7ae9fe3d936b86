"""A training step's gradients equal the eager reference's, under flash-attention's rule, for every
parameter: the recursive layers', the embedding's and the ranker's (whose gradient comes only
through the confidence-scaled CE), on every depth profile and both kv modes; on the packed path and
on the triton backend (host-sync packed path and sync-free static path; the interpreter on a CPU).

Reference: the eager (masked) model in float64; baseline: the same eager model in float32. The loss
is the recipe's: ``EdgeRecViTLoss`` (CCE with label smoothing + STB + DU) on the model's outputs.
"""
import copy

import pytest
import torch

import recvit
import recvit_kernels as rk
from test_ops import PROFILES, random_depths
from tolerance import assert_flash_rule

SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, num_heads=2, num_steps=4)
PATHS = [("packed", False), ("triton", False), ("triton", True)]


def gradients(model, images, depths, targets, kv, backend):
    """{parameter name: gradient} of one step of the recipe's loss."""
    model.zero_grad(set_to_none=True)
    out = model(images, depths=depths, return_aux=True, kv=kv, backend=backend)
    recvit.EdgeRecViTLoss(label_smoothing=0.1)(out, targets).total.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kv", ["active", "all"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend,static_shapes", PATHS, ids=["packed", "triton", "triton-static"])
def test_training_gradients_equal_eager(backend, static_shapes, profile, kv):
    if backend == "triton" and rk.unavailable_reason("triton") is not None:
        pytest.skip(rk.unavailable_reason("triton"))
    model = recvit.create_model("edge_recvit_tiny", **SMALL).train()
    reference_model = copy.deepcopy(model).double()
    model.recursion.static_shapes = static_shapes
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    depths = random_depths(2, model.num_tokens, model.num_steps, profile)

    ours = gradients(model, images, depths, targets, kv, backend)
    theirs = gradients(model, images, depths, targets, kv, "eager")
    reference = gradients(reference_model, images.double(), depths, targets, kv, "eager")
    assert ours.keys() == theirs.keys() == reference.keys()
    assert any(name.startswith("ranker.") for name in ours)
    for name, grad in reference.items():
        floor = 1e-6 * float(grad.abs().max()) + 1e-9
        try:
            assert_flash_rule(ours[name], theirs[name], grad, floor)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def autocast_gradients(model, images, depths, targets, backend, dtype):
    """(logits, {name: gradient}) of one step of the recipe's loss, under autocast to ``dtype`` if any."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype or torch.float32, enabled=dtype is not None):
        out = model(images, depths=depths, return_aux=True, backend=backend)
        loss = recvit.EdgeRecViTLoss(label_smoothing=0.1)(out, targets).total
    loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                 if p.grad is not None}


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.float16),  # the interpreter runs fp16, not bf16
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("static_shapes", [False, True], ids=["packed", "static"])
def test_autocast_training_step_on_triton(device, dtype, static_shapes):
    """Under autocast the triton backend runs the steps in the autocast dtype (its kernels take one
    dtype a call, where autocast would mix fp32 LayerNorm with 16-bit GEMMs). Logits and every
    gradient against the fp64 eager reference: at most twice eager-under-autocast's error, plus a
    floor of one rounding of the dtype (its eps) of the largest entry: here the residual stream is
    16-bit, autocast's stays fp32. bf16's eps is 8x fp16's (7.8e-3 against 9.8e-4): a floor of 1e-3
    fits fp16 only (the same step emulated in bf16 on the CPU, eager ops on the rows cast to bf16 with
    fused prefix-linear epilogues, broke it on 11 of 12 seeds, by up to 1.7x)."""
    if rk.unavailable_reason("triton") is not None:
        pytest.skip(rk.unavailable_reason("triton"))
    model = recvit.create_model("edge_recvit_tiny", **SMALL).to(device).train()
    reference_model = copy.deepcopy(model).double()
    model.recursion.static_shapes = static_shapes
    images, targets = torch.randn(2, 3, 32, 32, device=device), torch.tensor([3, 7], device=device)
    depths = random_depths(2, model.num_tokens, model.num_steps).to(device)

    ours = autocast_gradients(model, images, depths, targets, "triton", dtype)
    theirs = autocast_gradients(model, images, depths, targets, "eager", dtype)
    reference = autocast_gradients(reference_model, images.double(), depths, targets, "eager", None)
    assert ours[1].keys() == reference[1].keys()
    pairs = [("logits", ours[0], theirs[0], reference[0])]
    pairs += [(name, ours[1][name], theirs[1][name], grad) for name, grad in reference[1].items()]
    for name, mine, eager, exact in pairs:
        try:
            assert_flash_rule(mine.float(), eager.float(), exact,
                              torch.finfo(dtype).eps * float(exact.abs().max()))
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
