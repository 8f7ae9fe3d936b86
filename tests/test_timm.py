"""Where timm is installed, recvit's models are in its registry (timm.create_model), whichever of timm and
recvit is imported first, and ``import recvit`` does not import timm.

timm needs torchvision to import; there is no CPU build of torchvision here, so without timm this file
is skipped and .ci/run runs it in a venv with timm (and an older torchvision whose import survives
without its compiled ops)."""
import subprocess
import sys

import pytest

timm = pytest.importorskip(
    "timm", reason="timm is not installed or does not import here (it needs torchvision); .ci/run runs this "
    "file in a venv that has it")

import torch  # noqa: E402

import recvit  # noqa: E402


def _python(code):
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


@pytest.mark.parametrize("order", ["import recvit; print('timm' in sys.modules); import timm",
                                   "import timm, recvit; print(False)"])
def test_timm_create_model_builds_recvit_models(order):
    """Either import order; `import recvit` alone does not import timm (printed False)."""
    code = (f"import sys; {order}\n"
            "model = timm.create_model('edge_recvit_small', pretrained=False, num_classes=10)\n"
            "print(type(model).__name__, model.num_classes, type(timm.create_model('mor_vit_tiny')).__name__)\n"
            "print(*timm.list_models('edge_recvit_*'), *timm.list_models('mor_vit_*'), *timm.list_models('deit_*_early_exit'))")
    timm_imported, built, classes, mor, *names = _python(code)
    assert (timm_imported, built, classes, mor) == ("False", "EdgeRecViT", "10", "MoRViT")
    assert sorted(names) == recvit.list_models()


def test_timm_model_is_recvits():
    """Same class, same parameters from the same seed; pretrained=True is refused naming the way to load weights."""
    torch.manual_seed(0)
    theirs = timm.create_model("edge_recvit_tiny", pretrained=False, img_size=32, patch_size=8)
    torch.manual_seed(0)
    ours = recvit.create_model("edge_recvit_tiny", img_size=32, patch_size=8)
    assert type(theirs) is type(ours)
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="pretrained=True: recvit publishes no pretrained weights.*load_checkpoint"):
        timm.create_model("edge_recvit_tiny", pretrained=True)
