"""What a new user hits (issue 20, section 4): each mistake gets a clear error naming the argument or
file, before any work starts where possible; never a raw traceback from deep inside, never silence."""
import os
import sys

import pytest
import torch

import recvit
from recvit.training import train
from recvit.cli import main as cli_main
from recvit.training.data import ImageFolder, UnreadableImageError, build_transform, make_shapes_dataset
from recvit.models.losses import MoRViTLoss

SMALL = dict(img_size=32, patch_size=16, embed_dim=32, num_heads=2, num_steps=3, num_classes=4)
TINY = ["--model", "edge_recvit_tiny", "--img-size", "32", "--patch-size", "8", "--workers", "0",
        "--no-progress", "--no-plot", "--epochs", "1", "--batch-size", "8"]
TORCH_ADVICE = "weights_only"  # torch's UnpicklingError advises weights_only=False: never to be quoted


def _cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(list(argv))
    assert exit_info.value.code != 0
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def edge_output():
    torch.manual_seed(0)
    model = recvit.create_model("edge_recvit_tiny", **SMALL)
    return model(torch.randn(2, 3, 32, 32), return_aux=True)


@pytest.mark.parametrize("target, error, match", [
    (torch.tensor([0, 1, 2]), ValueError, r"target: expected shape \(2,\)"),
    (torch.tensor([[0], [1]]), ValueError, r"target: expected shape \(2,\)"),
    (torch.tensor([0, 4]), ValueError, r"in 0\.\.3 \(the model has 4 classes\), got values in 0\.\.4"),
    (torch.tensor([-1, 0]), ValueError, r"in 0\.\.3 .* got values in -1\.\.0"),
    (torch.tensor([0.0, 1.0]), ValueError, "target: expected integer class indices"),
    (torch.eye(4)[[0, 1]], ValueError, r"one-hot or probabilities: pass target.argmax\(1\)"),
    (torch.eye(4, dtype=torch.int64)[[0, 1]], ValueError, r"one-hot: pass target.argmax\(1\)"),
    ([0, 1], TypeError, "target: expected a torch.Tensor"),
])
def test_loss_refuses_targets_that_are_not_class_indices(edge_output, target, error, match):
    with pytest.raises(error, match=match):
        recvit.EdgeRecViTLoss()(edge_output, target)


def test_mor_vit_loss_checks_its_targets_too():
    torch.manual_seed(0)
    model = recvit.create_model("mor_vit_tiny", **SMALL)
    out = model(torch.randn(2, 3, 32, 32), return_aux=True)
    with pytest.raises(ValueError, match=r"in 0\.\.3"):
        MoRViTLoss()(out, torch.tensor([0, 9]))
    MoRViTLoss()(out, torch.tensor([0, 3])).total.backward()  # the valid extremes pass


def test_loss_of_a_forward_without_gradients():
    model = recvit.create_model("edge_recvit_tiny", **SMALL)
    images, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    with torch.no_grad():
        out = model(images, return_aux=True)
    with pytest.raises(ValueError, match="output: computed without gradients"):
        recvit.EdgeRecViTLoss()(out, target)
    with torch.no_grad():  # evaluating the loss alone is fine
        assert torch.isfinite(recvit.EdgeRecViTLoss()(out, target).total)


@pytest.mark.parametrize("make_loss, match", [
    (lambda: recvit.EdgeRecViTLoss(label_smoothing=-0.1), "label_smoothing=-0.1: expected a finite number >= 0"),
    (lambda: recvit.EdgeRecViTLoss(label_smoothing=2.0), r"label_smoothing=2.0: expected a number in \[0, 1\]"),
    (lambda: recvit.EdgeRecViTLoss(lambda_stb=-1.0), "lambda_stb=-1.0"),
    (lambda: recvit.EdgeRecViTLoss(lambda_du=float("nan")), "lambda_du=nan"),
    (lambda: MoRViTLoss(lambda_z=-1.0), "lambda_z=-1.0"),
    (lambda: MoRViTLoss(lambda_balance=float("inf")), "lambda_balance=inf"),
])
def test_loss_weights_are_checked_when_built(make_loss, match):
    with pytest.raises(ValueError, match=match):
        make_loss()


@pytest.mark.parametrize("overrides, match", [
    (dict(img_size=(224, 192)), r"img_size=\(224, 192\): only square images"),
    (dict(patch_size=0), "patch_size=0: expected an integer >= 1"),
    (dict(patch_size=-16), "patch_size=-16"),
    (dict(img_size=-32), "img_size=-32: expected an integer >= 1"),
    (dict(img_size=0), "img_size=0"),
    (dict(img_size=32.0, patch_size=16), "img_size=32.0"),
    (dict(img_size="224"), "img_size='224'"),
    (dict(num_classes=-1), "num_classes=-1: expected an integer >= 0"),
    (dict(num_heads=0), "num_heads=0"),
    (dict(embed_dim=0, num_heads=1), "embed_dim=0"),
    (dict(num_steps=2.5), "num_steps=2.5"),
    (dict(mlp_ratio=0), "mlp_ratio=0"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio=nan"),
    (dict(in_chans=0), "in_chans=0"),
    (dict(eps=-1.0), "eps=-1.0"),
])
@pytest.mark.parametrize("name", ["edge_recvit_tiny", "mor_vit_tiny"])
def test_create_model_refuses_bad_settings(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        recvit.create_model(name, **overrides)


def test_square_img_size_pair_is_one_side():
    model = recvit.create_model("edge_recvit_tiny", **{**SMALL, "img_size": (32, 32)})
    assert model.patch_embed.img_size == 32 and model.num_tokens == 5
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("name", ["edge_recvit_tiny", "mor_vit_tiny"])
@pytest.mark.parametrize("setting", ["backend", "kv"])
def test_empty_backend_or_kv_is_not_the_default(name, setting):
    model = recvit.create_model(name, **SMALL)
    with pytest.raises(ValueError, match=f"{setting}='': expected one of"):
        model(torch.randn(1, 3, 32, 32), **{setting: ""})
    with pytest.raises(ValueError, match="backend='': expected one of"):
        recvit.create_model(name, backend="", **SMALL)


def test_count_flops_refuses_an_empty_kv():
    model = recvit.create_model("edge_recvit_tiny", **SMALL)
    with pytest.raises(ValueError, match="kv='': expected one of"):
        recvit.count_flops(model, torch.ones(1, model.num_tokens, dtype=torch.int64), kv="")


def test_save_checkpoint_into_a_missing_folder_or_a_directory(tmp_path):
    model = recvit.create_model("edge_recvit_tiny", **SMALL)
    for name in ("model.safetensors", "model.pt"):
        with pytest.raises(FileNotFoundError, match=f"the folder {tmp_path / 'missing'} does not exist"):
            recvit.save_checkpoint(model, tmp_path / "missing" / name)
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.pt'?: a directory"):
        recvit.save_checkpoint(model, tmp_path / "folder.pt")
    assert sorted(os.listdir(tmp_path)) == ["folder.pt"]  # no temporary file left behind


def test_load_checkpoint_of_a_directory_says_so(tmp_path):
    model = recvit.create_model("edge_recvit_tiny", **SMALL)
    with pytest.raises(IsADirectoryError, match="a directory, expected a checkpoint file"):
        recvit.load_checkpoint(model, tmp_path)


def _corrupt_torch_file(path):
    """A file that starts like a torch pickle and is garbage after (torch's reader fails in its pickle)."""
    path.write_bytes(b"\x80\x02" + bytes(range(7, 250)) * 2)
    return path


def test_corrupt_torch_file_never_advises_weights_only_false(tmp_path):
    model = recvit.create_model("edge_recvit_tiny", **SMALL)
    path = _corrupt_torch_file(tmp_path / "corrupt.pt")
    with pytest.raises(ValueError) as info:
        recvit.load_checkpoint(model, path)
    assert str(path) in str(info.value) and "cannot be read (truncated or corrupt?)" in str(info.value)
    assert TORCH_ADVICE not in str(info.value) and "more than tensors" not in str(info.value)


@pytest.fixture
def shapes(tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(str(data), images_per_class=4, val_per_class=2, size=32, seed=5)
    return data


def test_train_resume_and_eval_of_a_corrupt_checkpoint(shapes, tmp_path, capsys):
    path = _corrupt_torch_file(tmp_path / "corrupt.pt")
    for argv in (["train", "--data", str(shapes), "--output", str(tmp_path / "run"), "--resume", str(path)],
                 ["eval", "--data", str(shapes), "--checkpoint", str(path)]):
        err = _cli_error(capsys, *argv)
        assert f"{path}: a torch file that cannot be read" in err and TORCH_ADVICE not in err, err


def test_directory_given_as_a_checkpoint(shapes, tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    for argv, argument in ((["eval", "--data", str(shapes), "--checkpoint", str(folder)], "--checkpoint"),
                           (["train", "--data", str(shapes), "--init", str(folder), *TINY], "--init"),
                           (["train", "--data", str(shapes), "--resume", str(folder)], "--resume")):
        err = _cli_error(capsys, *argv, *(["--output", str(tmp_path / "run")] if argv[0] == "train" else []))
        said = "is a folder but not a `recvit train` run" if argument == "--checkpoint" else "is a directory"
        assert f"argument {argument}: {folder} {said}" in err and "no such file" not in err, err


@pytest.mark.parametrize("kind", ["text named .png", "truncated jpeg"])
def test_train_names_an_unreadable_image(shapes, tmp_path, capsys, kind):
    from PIL import Image

    if kind == "text named .png":
        bad = shapes / "train" / "red-disc" / "notes.png"
        bad.write_text("not an image")
    else:
        whole = tmp_path / "whole.jpg"
        Image.effect_noise((64, 64), 40).convert("RGB").save(whole)
        bad = shapes / "train" / "red-disc" / "cut.jpg"
        bad.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert cli_main(["train", "--data", str(shapes), "--output", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"recvit train: error: {bad}: cannot read this image" in err and "Traceback" not in err, err


def test_an_unreadable_image_in_a_loader_worker_keeps_its_one_line_message(tmp_path):
    make_shapes_dataset(str(tmp_path), images_per_class=1, val_per_class=0, size=32, classes=("red-disc",))
    bad = tmp_path / "train" / "red-disc" / "notes.png"
    bad.write_text("not an image")
    folder = ImageFolder(str(tmp_path / "train"), build_transform(32, train=False))
    loader = torch.utils.data.DataLoader(folder, batch_size=2, num_workers=1)
    with pytest.raises(UnreadableImageError) as info:
        next(iter(loader))
    assert str(info.value).startswith(f"{bad}: cannot read this image") and "\n" not in str(info.value)


def fake_torchvision(monkeypatch) -> list:
    """torchvision as recvit meets it, where it cannot import (no CPU build here): transforms that do
    nothing, and an ImageFolder that refuses a class folder without images as torchvision's does
    (its make_dataset: a FileNotFoundError "Found no valid file for the classes ..."). Returns the
    roots the ImageFolder was built on."""
    import types

    from recvit.training.data import IMG_EXTENSIONS

    built = []

    class ImageFolder:
        def __init__(self, root, transform=None, loader=None):
            built.append(root)
            classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
            empty = [name for name in classes if not any(file.lower().endswith(IMG_EXTENSIONS) for _, _, files
                                                         in os.walk(os.path.join(root, name)) for file in files)]
            if empty:
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. Supported "
                                        f"extensions are: {', '.join(IMG_EXTENSIONS)}")

    transforms = types.ModuleType("torchvision.transforms")
    for name in ("RandomResizedCrop", "RandomHorizontalFlip", "Resize", "CenterCrop", "ToTensor", "Normalize",
                 "Compose"):
        setattr(transforms, name, lambda *args, **kwargs: None)
    datasets = types.ModuleType("torchvision.datasets")
    datasets.ImageFolder = ImageFolder
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms, torchvision.datasets = transforms, datasets
    for name, module in (("torchvision", torchvision), ("torchvision.transforms", transforms),
                         ("torchvision.datasets", datasets)):
        monkeypatch.setitem(sys.modules, name, module)
    return built


@pytest.mark.parametrize("loader", ["pillow", "torchvision"])
def test_train_refuses_a_class_folder_without_images(shapes, tmp_path, capsys, monkeypatch, loader):
    """recvit's error with either loader; torchvision (faked here, see fake_torchvision) is handed a
    folder only once recvit has checked it, and gets the folders that pass."""
    from recvit.training.data import have_torchvision, image_folder

    built = fake_torchvision(monkeypatch) if loader == "torchvision" else []
    assert have_torchvision() == (loader == "torchvision")
    (shapes / "train" / "empty-class").mkdir()
    assert cli_main(["train", "--data", str(shapes), "--output", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"class folder(s) of {shapes / 'train'} without images" in err and "empty-class" in err, err
    assert "Found no valid file" not in err and built == []
    if loader == "torchvision":
        dataset = image_folder(str(shapes / "val"), 32, train=False)
        assert built == [str(shapes / "val")] and type(dataset).__module__ == __name__


def test_train_refuses_one_class(tmp_path, capsys):
    make_shapes_dataset(str(tmp_path / "one"), images_per_class=8, val_per_class=0, size=32, classes=("red-disc",))
    err = _cli_error(capsys, "train", "--data", str(tmp_path / "one"), "--output", str(tmp_path / "run"), *TINY)
    assert "argument --data" in err and "classification needs at least 2 classes" in err
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_existing_run_unless_resume_or_overwrite(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    old = {"metrics.jsonl": b'{"epoch": 1}\n', "last.pt": b"old checkpoint", "model.safetensors": b"old model",
           "plot.png": b"old plot", "config.json": b"{}", "notes.txt": b"mine"}
    for name, content in old.items():
        (run / name).write_bytes(content)
    err = _cli_error(capsys, "train", "--data", str(shapes), "--output", str(run), *TINY)
    assert f"argument --output: {run} holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {name: (run / name).read_bytes() for name in old} == old  # nothing lost
    err = _cli_error(capsys, "train", "--data", str(shapes), "--output", str(run), "--resume", "--overwrite")
    assert "argument --overwrite: not with --resume" in err
    # --overwrite starts afresh: no file of the old run outlives it beside the new one
    assert cli_main(["train", "--data", str(shapes), "--output", str(run), "--overwrite", "--stop-after", "1",
                     *TINY]) == 0
    assert not (run / "model.safetensors").exists() and not (run / "plot.png").exists()
    assert (run / "metrics.jsonl").read_text() == "" and (run / "notes.txt").read_bytes() == b"mine"
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["args"]["overwrite"]) == (0, 1, True)
    # the run it left resumes (its recorded --overwrite does not clash with --resume)
    assert train.parse_args(["--output", str(run), "--resume"]).overwrite is False


def test_train_checks_the_model_settings_before_any_work(shapes, tmp_path, capsys):
    for argv, words in ((["--backend", ""], "backend='': expected one of"),
                        (["--img-size", "-32"], "img_size=-32: expected an integer >= 1"),
                        (["--img-size", "4"], "patch_size=8: expected an int in 1..img_size=4")):
        err = _cli_error(capsys, "train", "--data", str(shapes), "--output", str(tmp_path / "run"), *TINY, *argv)
        assert "argument --model/--img-size/--patch-size/--backend: " + words in err, err
    assert not (tmp_path / "run").exists()


def test_eval_of_a_checkpoint_for_other_classes_says_the_class_counts_differ(shapes, tmp_path, capsys):
    from recvit.bench import DeiTDense

    deit = DeiTDense(img_size=32, patch_size=8, num_classes=1000, embed_dim=192, num_heads=3)
    torch.save(deit.state_dict(), tmp_path / "deit.pth")
    err = _cli_error(capsys, "eval", "--data", str(shapes), "--checkpoint", str(tmp_path / "deit.pth"),
                     "--model", "edge_recvit_tiny", "--img-size", "32", "--patch-size", "8", "--workers", "0")
    assert "a classifier for 1000 classes" in err and f"{shapes / 'val'} has 4 class folders" in err, err
    assert "embed_dim" not in err


def test_eval_of_a_truncated_safetensors_file(shapes, tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    recvit.save_checkpoint(recvit.create_model("edge_recvit_tiny", img_size=32, patch_size=8, num_classes=4), path)
    path.write_bytes(path.read_bytes()[:1000])
    err = _cli_error(capsys, "eval", "--data", str(shapes), "--checkpoint", str(path), "--model", "edge_recvit_tiny",
                     "--img-size", "32", "--patch-size", "8", "--workers", "0")
    assert f"argument --checkpoint: {path}: a safetensors file that cannot be read" in err, err


@pytest.mark.parametrize("command", ["eval", "train", "depthmap"])
def test_sharded_checkpoint_with_a_missing_shard(shapes, tmp_path, capsys, command):
    """eval, train --init and depthmap take a sharded checkpoint's index; a shard it lists that is
    missing is named in one line (a FileNotFoundError, which these commands passed on as a traceback)."""
    from test_public_checkpoint import write_sharded

    model = recvit.create_model("edge_recvit_tiny", img_size=32, patch_size=8, num_classes=4)
    write_sharded(tmp_path, model.state_dict())
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    index = tmp_path / "model.safetensors.index.json"
    said = f"{index}: lists the shard 'model-00003-of-00003.safetensors', which {tmp_path} lacks"
    if command == "train":
        assert cli_main(["train", "--data", str(shapes), "--output", str(tmp_path / "run"), "--init", str(index),
                         *TINY]) == 2
        err = capsys.readouterr().err
        assert f"recvit train: error: {said}" in err and "Traceback" not in err, err
        return
    if command == "eval":
        argv = ["eval", "--data", str(shapes), "--workers", "0", "--img-size", "32", "--patch-size", "8"]
    else:
        pytest.importorskip("matplotlib")
        from PIL import Image

        Image.effect_noise((32, 32), 40).convert("RGB").save(tmp_path / "image.png")
        argv = ["depthmap", str(tmp_path / "image.png"), "-o", str(tmp_path / "out.png")]
    err = _cli_error(capsys, *argv, "--checkpoint", str(index), "--model", "edge_recvit_tiny")
    assert f"argument --checkpoint: {said}" in err, err


def test_output_and_json_paths_are_checked_first(shapes, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = _cli_error(capsys, "train", "--data", str(shapes), "--output", str(tmp_path / "file"), *TINY)
    assert f"argument --output: {tmp_path / 'file'} is a file" in err
    err = _cli_error(capsys, "eval", "--data", str(shapes), "--checkpoint", str(tmp_path / "file"),
                     "--json", str(tmp_path / "missing" / "metrics.json"))
    assert f"argument --json: the folder {tmp_path / 'missing'} does not exist" in err


def test_load_checkpoint_for_other_classes_names_the_class_count_not_the_width():
    from recvit.bench import DeiTDense

    deit = DeiTDense(img_size=32, patch_size=8, num_classes=1000, embed_dim=192, num_heads=3)
    model = recvit.create_model("edge_recvit_tiny", img_size=32, patch_size=8, num_classes=4)
    with pytest.raises(ValueError) as info:
        recvit.load_checkpoint(model, deit.state_dict())
    assert "; this model has num_classes 4." in str(info.value) and "has embed_dim" not in str(info.value)


@pytest.mark.parametrize("argv, words", [
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0, got inf"),
    (["--warmup-epochs", "nan"], "argument --warmup-epochs: expected a finite number >= 0, got nan"),
    (["--clip-grad", "inf"], "argument --clip-grad: expected a finite number >= 0, got inf"),
])
def test_train_refuses_numbers_that_are_not_finite(shapes, tmp_path, capsys, argv, words):
    assert words in _cli_error(capsys, "train", "--data", str(shapes), "--output", str(tmp_path / "run"), *TINY, *argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_eval_on_cuda_without_a_device(shapes, tmp_path, capsys):
    torch.save({"weight": torch.ones(1)}, tmp_path / "weights.pt")
    err = _cli_error(capsys, "eval", "--data", str(shapes), "--checkpoint", str(tmp_path / "weights.pt"),
                     "--device", "cuda")
    assert "argument --device: device='cuda': no CUDA device is available here" in err


def test_flops_img_size_that_is_not_a_number(capsys):
    err = _cli_error(capsys, "flops", "--img-size", "abc")
    assert "argument --img-size: expected a positive integer, got 'abc'" in err and "_positive_int" not in err
