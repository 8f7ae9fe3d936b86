"""Triton launches on the *current* CUDA device (and its stream), not its tensors': a model on cuda:1
while device 0 is current ran its kernels on device 0. Every launch runs under
``_common.on_device(tensor)``. Without a second GPU the guard is replaced by a recorder and each
Triton launch checks that a guard for its tensors' device is entered around it.
"""
import types

import pytest
import torch

import recvit
import recvit_kernels as rk

if rk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {rk.unavailable_reason('triton')}", allow_module_level=True)

import recvit_kernels.triton as triton_backend  # noqa: E402
from launches import _triton_kernels  # noqa: E402
from recvit_kernels.triton import _common  # noqa: E402


def test_guard_makes_a_cuda_tensors_device_current():
    guard = _common.on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with _common.on_device(torch.zeros(1)):  # the interpreter's CPU tensors: nothing to switch
        pass


def test_every_triton_launch_runs_on_its_tensors_device(monkeypatch):
    current = []  # the devices the guards entered made current, innermost last

    class Recorder:
        def __init__(self, tensor):
            self.device = tensor.device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *error):
            current.pop()

    modules = [module for module in vars(triton_backend).values()
               if isinstance(module, types.ModuleType) and hasattr(module, "on_device")]
    for module in modules:
        monkeypatch.setattr(module, "on_device", Recorder)
    launches = []
    for kernel in _triton_kernels():
        def run(*args, _kernel=kernel, _run=kernel.run, **kwargs):
            devices = {arg.device for arg in args if isinstance(arg, torch.Tensor)}
            launches.append((_kernel.fn.__name__, current[-1] if current else None, devices))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)

    model = recvit.create_model("edge_recvit_tiny", img_size=32, patch_size=8, num_classes=10, embed_dim=64,
                                num_heads=2, num_steps=3)
    images = torch.randn(2, 3, 32, 32)
    for static in (False, True):  # the packed path (rk.mlp) and the sync-free one (rk.prefix_linear)
        model.recursion.static_shapes = static
        model(images, backend="triton").sum().backward()
        with torch.no_grad():
            model(images, backend="triton")
    unguarded = [(name, device, devices) for name, device, devices in launches if {device} != devices]
    assert launches and not unguarded, unguarded
    kernels = {kernel.fn.__name__ for kernel in _triton_kernels() if kernel.fn.__name__.endswith("_kernel")}
    assert {name for name, _, _ in launches} == kernels  # all nine (not the jit helpers they call)


@pytest.mark.gpu
def test_model_on_the_second_gpu_while_the_first_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    model = recvit.create_model("edge_recvit_tiny", img_size=32, patch_size=8, num_classes=10, embed_dim=64,
                                num_heads=2).to("cuda:1").eval()
    images = torch.randn(2, 3, 32, 32, device="cuda:1")
    torch.cuda.set_device(0)
    with torch.no_grad():
        expected = model(images, backend="eager")
        for static in (False, True):
            model.recursion.static_shapes = static
            torch.testing.assert_close(model(images, backend="triton"), expected, atol=2e-4, rtol=2e-4)
