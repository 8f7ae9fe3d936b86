"""The ``recvit`` command line: every subcommand runs, bad input exits non-zero naming the argument."""
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import save as torch_save

import recvit
from recvit.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _fails(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_info(capsys):
    code, out, _ = _run(capsys, "info")
    assert code == 0
    for word in ("torch", "triton", "device", "eager", "packed", "triton", "cuda"):
        assert word in out
    assert "packed  available" in out


def test_flops_table1(capsys):
    code, out, _ = _run(capsys, "flops", "--model", "edge_recvit_base", "--alpha-sums", "8.21", "6.64")
    assert code == 0
    lines = {line[:21].strip(): line[21:].split() for line in out.splitlines() if len(line) > 21}
    assert lines["Patch embedding"][0] == "0.231"
    assert lines["Ranker (EARR)"][0] == "0.472"
    assert lines["Attention"][0].startswith("8.42")
    assert lines["MLP"][0].startswith("15.26")
    assert lines["Blocks (attn + MLP)"][0] == "23.69"
    assert lines["Total"][0] == "24.39"
    assert "8.433" in out and "15.256" in out and "differ slightly" in out  # the note on the paper's split
    assert main(["flops"]) == 0 and capsys.readouterr().out == out  # the paper's sums are the default


def test_flops_full_depth(capsys):
    code, out, _ = _run(capsys, "flops", "--full-depth")
    assert code == 0
    lines = {line[:21].strip(): line[21:].split() for line in out.splitlines() if len(line) > 21}
    assert lines["Blocks (attn + MLP)"][0] == "34.89"
    assert lines["Total"][0] == "35.60"
    assert "34.90" in out  # the note on the paper's rounding


def test_flops_other_model_and_size(capsys):
    code, out, _ = _run(capsys, "flops", "--model", "edge_recvit_tiny", "--img-size", "32",
                        "--alpha-sums", "3", "2")
    assert code == 0 and "N0 = 5 tokens" in out and "Note" not in out


def _table(out):
    return {line[:21].strip(): line[21:].split() for line in out.splitlines() if len(line) > 21}


def test_flops_mor_vit_base_from_its_beta(capsys):
    code, out, _ = _run(capsys, "flops", "--model", "mor_vit_base")
    assert code == 0
    lines = _table(out)
    assert "Ranker (EARR)" not in lines and lines["Router (MoR)"][0] == "0.0012"
    assert lines["Patch embedding"][0] == "0.231"
    assert lines["Attention"][0] == "2.839" and lines["MLP"][0] == "5.266"
    assert lines["Total"][0] == "8.34"
    assert "beta = 0.35" in out and "N_l = 197, 128, 83, 54, 35, 23, 15, 10, 6, 4, 2, 1" in out
    assert "4.1 G for MoR-B/16" in out and "total / 2 = 4.17 G" in out
    code, out, _ = _run(capsys, "flops", "--model", "mor_vit_base", "--full-depth")
    assert code == 0 and _table(out)["Total"][0] == "35.13" and "Note" not in out


def test_flops_mor_vit_beta(capsys):
    code, out, _ = _run(capsys, "flops", "--model", "mor_vit_tiny", "--img-size", "64", "--beta", "0.5")
    assert code == 0 and "N_l = 17, 9, 5, 3, 2, 1, 1, 1, 1, 1, 1, 1" in out and "Note" not in out


@pytest.mark.parametrize("argv, message", [
    (["flops", "--model", "mor_vit_base", "--alpha-sums", "3", "2"],
     "argument --alpha-sums: 'mor_vit_base' routes by expert choice, whose depth profile is fixed"),
    (["flops", "--model", "mor_vit_base", "--beta", "1.5"], "argument --beta 1.5: cannot build 'mor_vit_base'"),
    (["flops", "--beta", "0.3"], "argument --beta: 'edge_recvit_base' has no beta: --beta sets MoR-ViT's"),
    (["flops", "--model", "nope"], "argument --model: unknown model 'nope'"),
    (["flops", "--alpha-sums", "8", "9"], "argument --alpha-sums: "),
    (["flops", "--alpha-sums", "13", "12"], "argument --alpha-sums: "),
    (["flops", "--alpha-sums", "8", "x"], "argument --alpha-sums: invalid float"),
    (["flops", "--img-size", "0"], "argument --img-size: "),
    (["flops", "--img-size", "8"], "argument --img-size 8: "),  # smaller than a patch
    (["flops", "--full-depth", "--alpha-sums", "1", "1"], "not allowed with"),
    (["params", "--model", "nope"], "argument --model: unknown model"),
    (["depthmap", "missing.png", "-o", "out.png"], "argument image: no such file"),
    (["depthmap", __file__, "-o", "out.xyz"], "argument -o/--output: unknown figure format '.xyz': expected one "
     "of"),
    (["depthmap", __file__, "-o", "out"], "argument -o/--output: unknown figure format (no extension)"),
])
def test_bad_input_exits(capsys, argv, message):
    err = _fails(capsys, *argv)
    assert message in err and "Traceback" not in err


def test_no_arguments_prints_the_help(capsys):
    """`recvit` alone lists the commands on stdout and exits 0, as `recvit --help` does."""
    code, out, err = _run(capsys)
    assert code == 0 and err == ""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == out
    assert out.startswith("usage: recvit") and all(name in out for name in ("info", "params", "bench", "eval"))


def test_params(capsys):
    code, out, _ = _run(capsys, "params")
    assert code == 0
    assert "except the classifier head" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("edge_recvit")}
    assert rows == {"edge_recvit_tiny": "1.6", "edge_recvit_small": "6.0", "edge_recvit_base": "23.2"}
    mor = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("mor_vit")}
    assert list(mor) == ["mor_vit_tiny", "mor_vit_small", "mor_vit_base"]
    tiny = recvit.create_model("mor_vit_tiny")
    without_head = sum(p.numel() for name, p in tiny.named_parameters() if not name.startswith("head."))
    assert mor["mor_vit_tiny"] == [f"{without_head / 1e6:.1f}", f"{sum(p.numel() for p in tiny.parameters()) / 1e6:.2f}"]
    code, out, _ = _run(capsys, "params", "--model", "edge_recvit_small")
    assert code == 0 and "edge_recvit_small" in out and "edge_recvit_base" not in out


def test_depthmap_command(capsys, tmp_path):
    import matplotlib.image

    image = tmp_path / "in.png"
    matplotlib.image.imsave(image, np.random.default_rng(0).random((40, 56, 3)))
    out_png = tmp_path / "out.png"
    code, out, _ = _run(capsys, "depthmap", str(image), "-o", str(out_png), "--model", "edge_recvit_tiny",
                        "--seed", "1")
    assert code == 0 and "196 patches" in out and "randomly initialised" in out
    assert matplotlib.image.imread(out_png).ndim == 3
    err = _fails(capsys, "depthmap", str(image), "-o", str(tmp_path / "no" / "out.png"))
    assert "argument -o/--output: directory does not exist" in err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert "argument image: cannot read" in _fails(capsys, "depthmap", str(bad), "-o", str(out_png))


def test_depthmap_checkpoint(capsys, tmp_path):
    import matplotlib.image

    from recvit.checkpoint import save_checkpoint

    image = tmp_path / "in.png"
    matplotlib.image.imsave(image, np.random.default_rng(0).random((32, 32, 3)))
    weights = tmp_path / "tiny.safetensors"
    save_checkpoint(recvit.create_model("edge_recvit_tiny"), weights)
    code, out, _ = _run(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"),
                        "--model", "edge_recvit_tiny", "--checkpoint", str(weights))
    assert code == 0 and "randomly initialised" not in out
    err = _fails(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"),
                 "--model", "edge_recvit_small", "--checkpoint", str(weights))
    assert "argument --checkpoint: " in err and "expected shape" in err
    assert "argument --checkpoint: no such file" in _fails(
        capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"), "--checkpoint", str(tmp_path / "x.pt"))


def test_depthmap_of_a_training_run(capsys, tmp_path, monkeypatch):
    """`--checkpoint` takes a `recvit train` run (folder, last.pt, model.safetensors beside config.json)
    without --model: the depths drawn are the trained model's; a --model that contradicts the run is refused."""
    import matplotlib.image

    from recvit import depthmap
    from test_train import count_torch_loads

    rng = np.random.default_rng(0)
    for label in ("a", "b"):  # a two-class ImageFolder of noise: enough for one optimiser step
        (tmp_path / "data" / "train" / label).mkdir(parents=True)
        for index in range(4):
            matplotlib.image.imsave(tmp_path / "data" / "train" / label / f"{index}.png", rng.random((32, 32, 3)))
    run = tmp_path / "run"
    _run(capsys, "train", "--data", str(tmp_path / "data"), "--output", str(run), "--epochs", "1", "--batch-size",
         "8", "--no-plot", "--model", "edge_recvit_tiny", "--img-size", "32", "--patch-size", "8", "--workers", "0",
         "--no-progress")
    trained = recvit.create_model("edge_recvit_tiny", num_classes=2, img_size=32, patch_size=8)
    recvit.load_checkpoint(trained, str(run / "model.safetensors"))
    image = tmp_path / "in.png"
    matplotlib.image.imsave(image, rng.random((32, 32, 3)))
    _, pixels, _ = depthmap.load_image(str(image), 32)
    expected = depthmap.depth_heatmap(trained.eval(), pixels)[0]
    drawn = {}
    monkeypatch.setattr(depthmap, "plot_depthmap",
                        lambda shown, depths, path, num_steps, title: drawn.update(depths=depths, title=title))
    reads = count_torch_loads(monkeypatch)
    for checkpoint in (run, run / "last.pt", run / "model.safetensors"):
        reads.clear()
        code, out, _ = _run(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"), "--checkpoint", str(checkpoint))
        assert code == 0 and "16 patches" in out and "randomly initialised" not in out
        last_reads = reads.count(str(run / "last.pt"))  # read once: the run's settings and weights
        assert last_reads == 1 if checkpoint == run / "last.pt" else last_reads <= 1, (checkpoint, reads)
        assert torch.equal(drawn["depths"], expected) and drawn["title"].startswith("edge_recvit_tiny ")
    err = _fails(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"), "--checkpoint", str(run),
                 "--model", "edge_recvit_base")
    assert "argument --model: edge_recvit_base contradicts the trained run, whose model is edge_recvit_tiny" in err
    garbage = tmp_path / "garbage.pt"  # not a run, nor readable: load_checkpoint's reason, naming the file
    garbage.write_bytes(b"garbage bytes here")
    err = _fails(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"), "--checkpoint", str(garbage),
                 "--model", "edge_recvit_tiny")
    assert f"argument --checkpoint: {garbage}: not a checkpoint file recvit can read" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"recvit {recvit.__version__}"


def _backend_lines(out):
    return {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")
            and line.split()[0] in ("eager", "packed", "triton", "cuda")}


@pytest.mark.parametrize("interpreter", ["1", None])
def test_info_and_check_agree_on_triton(interpreter):
    """`recvit check` on a CPU turns the Triton interpreter on; `recvit info` does not, yet both state the
    same: on a GPU, triton available; without one, interpreter only."""
    import os

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpreter:
        env["TRITON_INTERPRET"] = interpreter
    info = subprocess.run([sys.executable, "-m", "recvit", "info"], env=env, capture_output=True, text=True)
    check = subprocess.run([sys.executable, "-m", "recvit", "check", "--quick", "--only", "depth_sort"], env=env,
                           capture_output=True, text=True)
    assert info.returncode == 0 and check.returncode == 0, info.stderr + check.stderr
    told, checked = _backend_lines(info.stdout), _backend_lines(check.stdout)
    assert {name: line.split(":")[0] for name, line in told.items()} == \
        {name: line.split(":")[0] for name, line in checked.items()}  # available / unavailable / interpreter only
    import torch

    if not torch.cuda.is_available():
        assert told["triton"].startswith("interpreter only: no CUDA GPU")


def test_invalid_recvit_backend_is_reported_by_info(capsys, monkeypatch):
    monkeypatch.setenv("RECVIT_BACKEND", "bogus")
    code, out, _ = _run(capsys, "info")
    assert code == 1 and "RECVIT_BACKEND=bogus INVALID" in out and "'auto', 'eager'" in out
    monkeypatch.setenv("RECVIT_BACKEND", "packed")
    code, out, _ = _run(capsys, "info")
    assert code == 0 and "RECVIT_BACKEND=packed -> packed" in out
    monkeypatch.setenv("RECVIT_BACKEND", "")  # unset, as for every forward
    code, out, _ = _run(capsys, "info")
    assert code == 0 and "RECVIT_BACKEND" not in out


def test_closed_pipe_ends_quietly():
    """``recvit info | head -1``: the reader is gone before recvit writes; no BrokenPipeError."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "recvit", "info"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True)
    finally:
        os.close(write_end)
    assert done.returncode == 1 and done.stderr == ""


def test_depthmap_validates_the_output_format_before_building_the_model(capsys, tmp_path, monkeypatch):
    import recvit.models.registry

    monkeypatch.setattr(recvit.models.registry, "create_model", lambda *a, **k: pytest.fail("the model was built"))
    image = tmp_path / "in.png"
    image.write_bytes(b"")
    assert "unknown figure format '.xyz'" in _fails(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.xyz"))


def test_depthmap_says_it_centre_crops(capsys, tmp_path):
    import matplotlib.image

    image = tmp_path / "wide.png"
    matplotlib.image.imsave(image, np.random.default_rng(0).random((40, 64, 3)))
    code, out, _ = _run(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.svg"), "--model", "edge_recvit_tiny")
    assert code == 0 and "the 64x40 image was centre-cropped to 40x40" in out
    assert (tmp_path / "o.svg").read_text().lstrip().startswith("<?xml")


def test_depthmap_of_a_public_checkpoint_directory(capsys, tmp_path):
    import matplotlib.image

    from test_public_checkpoint import IMG, write_checkpoint

    write_checkpoint(tmp_path)
    image = tmp_path / "in.png"
    matplotlib.image.imsave(image, np.random.default_rng(0).random((IMG, IMG, 3)))
    code, out, _ = _run(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"), "--checkpoint", str(tmp_path))
    assert code == 0 and "16 patches" in out and "randomly initialised" not in out
    (tmp_path / "config.json").write_text("{}")
    assert "argument --checkpoint: " in _fails(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"),
                                               "--checkpoint", str(tmp_path))


def test_depthmap_off_the_patch_grid_shows_the_pixels_the_patches_cover(capsys, tmp_path, monkeypatch):
    """image_size 30 with 8-pixel patches: the model reads the top-left 24x24 pixels (3x3 patches), so
    the figure shows those, each depth over its own 8x8 patch, not the 3x3 grid stretched over 30x30."""
    import matplotlib.image

    from recvit import depthmap
    from test_public_checkpoint import PATCH, public_config, public_state, write_checkpoint

    write_checkpoint(tmp_path, public_state(tokens=10), public_config(image_size=30))
    image = tmp_path / "in.png"
    matplotlib.image.imsave(image, np.random.default_rng(0).random((30, 30, 3)))
    drawn = {}
    monkeypatch.setattr(depthmap, "plot_depthmap",
                        lambda shown, depths, path, num_steps, title: drawn.update(shown=shown, depths=depths))
    code, out, _ = _run(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"), "--checkpoint", str(tmp_path))
    assert code == 0 and "9 patches" in out and drawn["depths"].shape == (3, 3) and 3 * PATCH == 24
    whole = depthmap.load_image(str(image), 30).shown
    np.testing.assert_array_equal(drawn["shown"], whole[:24, :24])
    assert "the model reads the top-left 24x24 pixels only" in out, out


def test_bench_passes_arguments_through(monkeypatch):
    seen = []
    fake = types.ModuleType("recvit.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "recvit.bench", fake)
    monkeypatch.setattr(recvit, "bench", fake, raising=False)
    assert main(["bench", "--quick", "--batch", "2"]) == 0
    assert seen == [["--quick", "--batch", "2"]]


def test_python_dash_m():
    ok = subprocess.run([sys.executable, "-m", "recvit", "params", "--model", "edge_recvit_tiny"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "1.6" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "recvit", "flops", "--model", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "argument --model" in bad.stderr and "Traceback" not in bad.stderr


def test_depthmap_mor_vit(capsys, tmp_path):
    """MoR-ViT's depths come from its forward: expert choice fixes the histogram by N and beta."""
    import matplotlib.image

    from recvit import Block

    image = tmp_path / "in.png"
    matplotlib.image.imsave(image, np.random.default_rng(0).random((32, 32, 3)))
    code, out, _ = _run(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"), "--model", "mor_vit_tiny")
    counts = recvit.create_model("mor_vit_tiny").active_counts(197)
    mean = 1 + sum(count - 1 for count in counts[1:]) / 196  # 1 + the steps >= 2 each patch ran ([CLS] out)
    assert code == 0 and "196 patches" in out and f"mean depth {mean:.2f}" in out
    assert "router is randomly initialised" in out
    model = recvit.create_model("mor_vit_tiny")
    vit = {key: value for key, value in model.state_dict().items() if not key.startswith(("router.", "recursion."))}
    vit.update({f"blocks.{i}.{key}": value for i in range(12) for key, value in Block(192, 3).state_dict().items()})
    weights = tmp_path / "vit.pth"
    torch_save(vit, weights)
    code, out, _ = _run(capsys, "depthmap", str(image), "-o", str(tmp_path / "o.png"), "--model", "mor_vit_tiny",
                        "--checkpoint", str(weights))
    assert code == 0 and "no router weights" in out and "randomly initialised" not in out
