"""The fine-tuning recipe: torchrun with 2 Gloo processes, exact resume, it learns, `recvit eval`."""
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import recvit
from recvit.training import train
from recvit.cli import main as cli_main
from recvit.training.data import ImageFolder, SeededSamples, build_transform, make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "edge_recvit_tiny", "--img-size", "32", "--patch-size", "8", "--workers", "0",
        "--no-progress", "--lr", "1e-3", "--warmup-epochs", "1"]


@pytest.fixture
def one_thread():
    """In-process runs on one thread: CI has 2 cores, and fewer threads keep the runs reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(model):
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def _without_timing(history):
    return [{key: value for key, value in record.items() if not key.endswith("images_per_s")} for record in history]


def test_torchrun_two_gloo_processes(tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(str(data), images_per_class=16, val_per_class=4, size=32, seed=5)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import torch.distributed as dist
        from safetensors.torch import save_file
        from recvit.training import train

        result = train.run(train.parse_args(sys.argv[1:]))
        state = {key: value.detach().contiguous() for key, value in result.model.state_dict().items()}
        save_file(state, os.path.join(os.environ["WEIGHTS_DIR"], f"rank{os.environ['RANK']}.safetensors"))
    """))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "WEIGHTS_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               "--data", str(data), "--output", str(out), "--epochs", "3", "--batch-size", "8", *TINY]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from safetensors.torch import load_file

    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0), "the ranks' weights differ"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history] == [1, 2, 3]
    losses = [record["train_loss"] for record in history]
    assert losses[-1] < losses[0] - 0.1, losses
    # one process logged, and the epoch saw every image once: 2 processes x 4 steps x 8 images
    assert done.stdout.count("epoch 3:") == 1
    assert sum(history[0]["train_depth_histogram"]) == 64 * 16  # 64 images, 16 patch tokens each
    assert (out / "last.pt").is_file() and (out / "model.safetensors").is_file()
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] == 3 and len(saved["ranks"]) == 2
    assert all(torch.equal(saved["model"][key], rank0[key]) for key in rank0)
    assert (out / "plot.png").stat().st_size > 0  # matplotlib comes with the test extra


def test_resume_continues_exactly(tmp_path, one_thread):
    data = tmp_path / "data"
    make_shapes_dataset(str(data), images_per_class=10, val_per_class=2, size=32, seed=5)
    common = ["--data", str(data), "--epochs", "2", "--batch-size", "8", "--freeze-epochs", "1", "--no-plot", *TINY]
    straight = train.run(train.parse_args([*common, "--output", str(tmp_path / "a")]))
    # 5 steps per epoch: stop at step 3 (mid-epoch, stage 1), resume, stop at 7 (stage 2), resume to the end
    stopped = train.run(train.parse_args([*common, "--output", str(tmp_path / "b"), "--stop-after", "3"]))
    assert stopped.stopped_at == 3 and stopped.history == []
    checkpoint = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (0, 3)
    again = train.run(train.parse_args(["--output", str(tmp_path / "b"), "--resume", "--stop-after", "7"]))
    assert again.stopped_at == 7
    resumed = train.run(train.parse_args(["--output", str(tmp_path / "b"), "--resume"]))
    expected, got = _weights(straight.model), _weights(resumed.model)
    assert all(torch.equal(expected[key], got[key]) for key in expected), \
        [key for key in expected if not torch.equal(expected[key], got[key])]
    assert _without_timing(resumed.history) == _without_timing(straight.history)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_stage_one_freezes_the_recursive_block(tmp_path, one_thread):
    data = tmp_path / "data"
    make_shapes_dataset(str(data), images_per_class=4, val_per_class=0, size=32, seed=5)
    torch.manual_seed(0)
    args = train.parse_args(["--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "2",
                             "--freeze-epochs", "1", "--batch-size", "8", "--stop-after", "2", "--no-plot", *TINY])
    initial = _weights(train.build_model("edge_recvit_tiny", 4, 32, 8))  # the run seeds the same way
    result = train.run(args)
    final = _weights(result.model)
    assert all(torch.equal(initial[key], final[key]) for key in initial if key.startswith("recursion."))
    for prefix in ("patch_embed.", "ranker.", "head.", "norm.", "pos_embed"):
        assert any(not torch.equal(initial[key], final[key]) for key in initial if key.startswith(prefix)), prefix


def test_resume_refuses_changed_settings(tmp_path, one_thread, capsys):
    data = tmp_path / "data"
    make_shapes_dataset(str(data), images_per_class=4, val_per_class=0, size=32, seed=5)
    train.run(train.parse_args(["--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "2",
                                "--batch-size", "8", "--stop-after", "1", "--no-plot", *TINY]))
    with pytest.raises(SystemExit):
        train.parse_args(["--output", str(tmp_path / "run"), "--resume", "--lr", "0.5"])
    assert "--lr (0.5, the checkpoint has 0.001)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--output", str(tmp_path / "elsewhere"), "--resume"])
    assert "no such checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    ([], "--data: required"),
    (["--data", "/nonexistent"], "no train folder"),
    (["--epochs", "2", "--freeze-epochs", "2"], "--freeze-epochs: expected fewer than --epochs"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--batch-size", "0"], "--batch-size: expected >= 1"),
])
def test_bad_arguments_name_the_argument(tmp_path, capsys, argv, words):
    (tmp_path / "train" / "a").mkdir(parents=True)
    if argv[:1] != ["--data"] and argv:
        argv = ["--data", str(tmp_path), *argv]
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert words in capsys.readouterr().err


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """Tiny at 32 px, from scratch, 3 epochs of 8 steps on four coloured shapes (chance: 25 %).

    Each class has its own colour and shape. Classes that share a colour and differ in shape only
    (red/blue x disc/cross) are not learnt in this budget: 6 epochs stay at 50 %, the colour part.
    """
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(str(root / "data"), images_per_class=32, val_per_class=12, size=32, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train.run(train.parse_args(["--data", str(root / "data"), "--output", str(root / "run"),
                                             "--epochs", "3", "--batch-size", "16", "--min-scale", "0.6", *TINY]))
    finally:
        torch.set_num_threads(threads)
    return root, result


def test_learns_coloured_shapes(learned):
    _, result = learned
    last = result.history[-1]
    assert last["val_top1"] >= 75.0, [record["val_top1"] for record in result.history]
    shares = torch.tensor(last["val_depth_histogram"], dtype=torch.float64)
    shares /= shares.sum()
    assert shares.max() < 0.9 and (shares > 0.02).sum() >= 2, shares  # the depths have not collapsed to one
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_eval_cli_reproduces_the_last_validation(learned, capsys, tmp_path):
    root, result = learned
    report = tmp_path / "eval.json"
    code = cli_main(["eval", "--data", str(root / "data"), "--checkpoint", str(root / "run" / "last.pt"),
                     "--batch-size", "32", "--workers", "0", "--no-progress", "--json", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    for word in ("top-1", "top-5", "mean depth", "GFLOPs/image", "images/s"):
        assert word in out
    metrics, last = json.loads(report.read_text()), result.history[-1]
    assert metrics["images"] == 48
    for key in ("top1", "top5", "mean_depth", "depth_histogram"):
        assert metrics[key] == last[f"val_{key}"], key
    model = result.model
    lowest = recvit.count_flops(model, torch.ones(1, model.num_tokens, dtype=torch.int64)).total / 1e9
    assert lowest < metrics["gflops_per_image"] < recvit.full_depth_flops(model).total / 1e9
    assert metrics["gflops_per_image"] == pytest.approx(last["val_gflops_per_image"], rel=1e-12)
    assert metrics["images_per_s"] > 0


def test_eval_refuses_other_classes(learned, capsys, tmp_path):
    root, _ = learned
    make_shapes_dataset(str(tmp_path / "other"), images_per_class=1, val_per_class=1, size=32,
                        classes=("green-disc", "yellow-cross"))
    with pytest.raises(SystemExit):
        cli_main(["eval", "--data", str(tmp_path / "other"), "--checkpoint", str(root / "run" / "last.pt")])
    assert "differ from the checkpoint's" in capsys.readouterr().err


def test_eval_rebuilds_the_trained_ranker(tmp_path, capsys, one_thread):
    """A run with --ranker public_3layer records it: `recvit eval` builds the same model and reproduces
    the last validation; a checkpoint written before --ranker existed resumes with the default ranker."""
    data = tmp_path / "data"
    make_shapes_dataset(str(data), images_per_class=4, val_per_class=2, size=32, seed=5)
    result = train.run(train.parse_args(["--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "1",
                                         "--batch-size", "8", "--no-plot", "--ranker", "public_3layer", *TINY]))
    assert isinstance(result.model.ranker, recvit.models.edge_recvit.ThreeLayerRanker)
    report = tmp_path / "eval.json"
    assert cli_main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / "run" / "last.pt"),
                     "--workers", "0", "--no-progress", "--json", str(report)]) == 0
    capsys.readouterr()
    metrics, last = json.loads(report.read_text()), result.history[-1]
    for key in ("top1", "loss", "depth_histogram"):
        assert metrics[key] == last[f"val_{key}"], key

    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del state["args"]["ranker"]
    torch.save(state, tmp_path / "old.pt")
    assert train.parse_args(["--output", str(tmp_path / "run"), "--resume", str(tmp_path / "old.pt")]).ranker is None


def count_torch_loads(monkeypatch) -> list:
    """The files torch.load reads from now on (their paths, in call order)."""
    reads, load = [], torch.load

    def counting_load(file, *args, **kwargs):
        reads.append(str(getattr(file, "name", file)))
        return load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return reads


def test_eval_reads_a_run_without_its_settings(tmp_path, capsys, one_thread, monkeypatch):
    """`recvit eval --checkpoint` takes the run folder, its last.pt or its model.safetensors (beside
    config.json) with no --model/--img-size/--patch-size, and reproduces the last validation, reading
    last.pt once (the settings and the weights from the same read); a flag that contradicts the run
    is refused naming it; a folder that holds no run is refused."""
    import shutil

    data = tmp_path / "data"
    make_shapes_dataset(str(data), images_per_class=4, val_per_class=2, size=32, seed=5)
    run = tmp_path / "run"
    result = train.run(train.parse_args(["--data", str(data), "--output", str(run), "--epochs", "1",
                                         "--batch-size", "8", "--no-plot", *TINY]))
    last = result.history[-1]
    alone = tmp_path / "alone"  # the final weights with the run's config.json, without last.pt
    alone.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(run / name, alone / name)
    report = tmp_path / "eval.json"
    reads = count_torch_loads(monkeypatch)
    for checkpoint in (run, run / "last.pt", run / "model.safetensors", alone, alone / "model.safetensors"):
        reads.clear()
        assert cli_main(["eval", "--data", str(data), "--checkpoint", str(checkpoint), "--workers", "0",
                         "--no-progress", "--json", str(report), "--img-size", "32"]) == 0, checkpoint
        capsys.readouterr()
        last_reads = reads.count(str(run / "last.pt"))  # the folder reads it if it is newer than model.safetensors
        assert last_reads == 1 if checkpoint == run / "last.pt" else last_reads <= 1, (checkpoint, reads)
        metrics = json.loads(report.read_text())
        for key in ("top1", "loss", "depth_histogram"):
            assert metrics[key] == last[f"val_{key}"], (checkpoint, key)
    for flags, words in ((["--model", "edge_recvit_small"], "argument --model: edge_recvit_small contradicts"),
                         (["--img-size", "64"], "argument --img-size: 64 contradicts the trained run, whose "
                                                "img_size is 32"),
                         (["--patch-size", "16"], "argument --patch-size: 16 contradicts"),
                         (["--ranker", "public_3layer"], "argument --ranker: public_3layer contradicts")):
        with pytest.raises(SystemExit):
            cli_main(["eval", "--data", str(data), "--checkpoint", str(run), "--workers", "0", *flags])
        assert words in capsys.readouterr().err, flags
    with pytest.raises(SystemExit):
        cli_main(["eval", "--data", str(data), "--checkpoint", str(data)])
    assert "is a folder but not a `recvit train` run" in capsys.readouterr().err


def test_init_from_a_deit_checkpoint(tmp_path):
    from recvit.bench import DeiTDense

    deit = DeiTDense(img_size=32, patch_size=8, num_classes=10, embed_dim=192, num_heads=3)
    torch.save(deit.state_dict(), tmp_path / "deit.pth")
    model = train.build_model("edge_recvit_tiny", 4, 32, 8)
    note = train.load_init(model, str(tmp_path / "deit.pth"), layers=(1, 5, 11))
    assert "ranker" in note and "re-initialised for 4 classes" in note
    for role, block in (("head_layer", 1), ("shared_layer", 5), ("tail_layer", 11)):
        source = getattr(deit.blocks[block], "state_dict")()
        target = getattr(model.recursion, role).state_dict()
        assert all(torch.equal(source[key], target[key]) for key in source)
    assert torch.equal(model.patch_embed.proj.weight, deit.patch_embed.proj.weight)


@pytest.mark.parametrize("extension", ["pth", "safetensors"])
def test_init_reads_its_file_once(tmp_path, monkeypatch, extension):
    """`--init` with a classifier of another size (a new label set) reads the file once: the retry
    without the classifier uses what the first attempt read. A file that does not fit either way is
    still named."""
    import safetensors.torch
    from recvit.bench import DeiTDense

    deit = DeiTDense(img_size=32, patch_size=8, num_classes=10, embed_dim=192, num_heads=3)
    path = tmp_path / f"deit.{extension}"
    recvit.save_checkpoint(deit, path)
    reads, load_file = count_torch_loads(monkeypatch), safetensors.torch.load_file

    def counting_load_file(file, *args, **kwargs):
        reads.append(str(file))
        return load_file(file, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", counting_load_file)
    model = train.build_model("edge_recvit_tiny", 4, 32, 8)
    assert "re-initialised for 4 classes" in train.load_init(model, str(path))
    assert reads == [str(path)]
    assert torch.equal(model.patch_embed.proj.weight, deit.patch_embed.proj.weight)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*does not fit EdgeRecViT"):
        train.load_init(train.build_model("edge_recvit_small", 4, 32, 8), str(path))


def test_warmup_cosine_per_stage():
    schedule = train.WarmupCosine([10, 20], warmup_steps=4, floor=0.1)
    assert [schedule(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert schedule(10) == 0.25  # stage 2 warms up again
    assert schedule(13) == 1.0 and schedule(29) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert all(schedule(a) >= schedule(a + 1) for a in range(13, 29))


def test_image_folder_and_seeded_augmentation(tmp_path):
    make_shapes_dataset(str(tmp_path), images_per_class=3, val_per_class=0, size=40,
                        classes=("red-disc", "blue-square"))
    (tmp_path / "train" / "red-disc" / "notes.txt").write_text("not an image")
    folder = ImageFolder(str(tmp_path / "train"), build_transform(32, train=True))
    assert folder.classes == ["blue-square", "red-disc"] and folder.targets == [0, 0, 0, 1, 1, 1]
    seeded = SeededSamples(folder, seed=7)
    image, target = seeded[4]
    assert image.shape == (3, 32, 32) and target == 1
    assert torch.equal(seeded[4][0], image)  # the same sample, epoch and seed: the same crop and flip
    seeded.set_epoch(1)
    assert not torch.equal(seeded[4][0], image)
    evaluation = ImageFolder(str(tmp_path / "train"), build_transform(32, train=False))
    assert torch.equal(evaluation[0][0], evaluation[0][0])
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(str(tmp_path / "train" / "red-disc"))


@pytest.mark.gpu
def test_bf16_training_on_a_gpu(tmp_path):
    """One process on the GPU with bf16 autocast (the default there): the loss falls, the weights stay
    fp32 and finite, and validation runs."""
    make_shapes_dataset(str(tmp_path / "data"), images_per_class=32, val_per_class=8, size=32, seed=8)
    result = train.run(train.parse_args(["--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"),
                                         "--device", "cuda", "--epochs", "3", "--batch-size", "16", *TINY]))
    history = result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_top1"] >= 75.0 and history[-1]["val_gflops_per_image"] > 0
    for name, param in result.model.named_parameters():
        assert param.is_cuda and param.dtype == torch.float32 and torch.isfinite(param).all(), name


def test_torchvision_and_pillow_loaders_agree(tmp_path):
    """Where torchvision imports (the GPU machines) it loads the folder; the Pillow loader must give the
    same classes, targets and tensors, augmentation included (checked bitwise against torchvision 0.28)."""
    pytest.importorskip("torchvision")
    from PIL import Image

    from recvit.training.data import image_folder

    make_shapes_dataset(str(tmp_path), images_per_class=3, val_per_class=2, size=40)
    for index, size in enumerate([(50, 37), (37, 61), (200, 90)]):  # odd shapes: every rounding path
        Image.effect_noise(size, 40).convert("RGB").save(tmp_path / "train" / "red-disc" / f"odd{index}.png")
    for split, train_mode in (("train", True), ("train", False), ("val", False)):
        theirs = SeededSamples(image_folder(str(tmp_path / split), 24, train_mode, torchvision=True), seed=3)
        ours = SeededSamples(image_folder(str(tmp_path / split), 24, train_mode, torchvision=False), seed=3)
        assert type(theirs.dataset).__module__.startswith("torchvision") and isinstance(ours.dataset, ImageFolder)
        assert theirs.dataset.classes == ours.dataset.classes and theirs.dataset.targets == ours.dataset.targets
        for epoch in range(2):
            theirs.set_epoch(epoch)
            ours.set_epoch(epoch)
            for i in range(len(ours)):
                assert torch.equal(theirs[i][0], ours[i][0]), (split, train_mode, epoch, i)
