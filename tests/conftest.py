import os

import torch

# Without a GPU, Triton kernels run on the CPU through the interpreter (set before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def set_allow_tf32():
    """``set_allow_tf32(flag)`` sets ``torch.backends.cuda.matmul.allow_tf32``; the value it had is
    restored when the test ends. Not ``monkeypatch.setattr``: torch serves the flag through the
    module's ``__getattr__``, so from pytest 9.2 (which restores what the instance ``__dict__``
    held) the undo deletes it, fails, and leaves TF32 as the test set it."""
    previous = torch.backends.cuda.matmul.allow_tf32

    def set_flag(flag: bool):
        torch.backends.cuda.matmul.allow_tf32 = flag

    try:
        yield set_flag
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
