"""Every code block of the README runs as written.

``python`` blocks are executed; each command of a ``bash`` block is run, or shown to run elsewhere:
``recvit ...`` commands run here through ``recvit.cli.main`` (the console script and ``python -m
recvit`` call the same function, see test_cli.py); the set-up and test commands must be the ones
``.ci/run`` runs; the CUDA build and the benchmark harness (minutes on a CPU; here only their entry
points are checked) run in the GPU test.
The blocks run in a temporary directory that holds the files the README names as the user's:
``photo.png`` (a non-square picture) and ``public_run/`` (a public Edge-RecViT checkpoint directory).
A block or command that fits none of these fails the test.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recvit.cli import main

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LONG = ("recvit bench", "python -m benchmarks.run", "pytest benchmarks/")  # minutes on a CPU
GPU_BUILD = ("pip install ninja", "TORCH_CUDA_ARCH_LIST=")


def blocks(language):
    text = (ROOT / "README.md").read_text()
    found = []
    for match in BLOCK.finditer(text):
        if match.group(1) == language:
            line = text.count("\n", 0, match.start()) + 1
            found.append(pytest.param(match.group(2), id=f"line{line}"))
    return found


def commands():
    """Each command line of the bash blocks, comments dropped, '&&' chains split."""
    found = []
    for param in blocks("bash"):
        for line in param.values[0].splitlines():
            command = " ".join(shlex.split(line, comments=True))
            if command:
                found.extend(part.strip() for part in re.split(r"\s&&\s", command))
    return found


def kind(command):
    if command.startswith(LONG):
        return "long"
    if command.startswith(GPU_BUILD):
        return "gpu"
    if command.startswith("recvit ") or command == "recvit":
        return "cli"
    return "ci"


def ci_commands():
    """.ci/run's commands, normalised as a user types them (no python -m pip, no --quiet)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    found = set()
    for line in lines:
        command = " ".join(part for part in shlex.split(line, comments=True) if part != "--quiet")
        found.add(command.replace("python -m pip ", "pip ", 1))
    return found


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    import matplotlib.image

    from test_public_checkpoint import write_checkpoint

    monkeypatch.chdir(tmp_path)
    y, x = np.mgrid[0:60, 0:80] / 80.0
    matplotlib.image.imsave(tmp_path / "photo.png", np.stack([x, y, 1 - x], -1))
    (tmp_path / "public_run").mkdir()
    write_checkpoint(tmp_path / "public_run")
    return tmp_path


def test_the_readme_has_code_blocks():
    assert len(blocks("python")) >= 2 and len(commands()) >= 8


@pytest.mark.parametrize("code", [b for b in blocks("python") if "cuda" not in b.values[0]])
def test_python_block_runs(code, user_files):
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("command", [c for c in commands() if kind(c) == "cli"])
def test_cli_command_runs(command, user_files, capsys):
    try:
        code = main(shlex.split(command)[1:])
    except SystemExit as exit_info:  # --version, or a usage error
        code = exit_info.code
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out


@pytest.mark.parametrize("command", [c for c in commands() if kind(c) == "ci"])
def test_setup_and_test_commands_are_what_ci_runs(command):
    assert command in ci_commands(), f"README command {command!r} is not run by .ci/run: {sorted(ci_commands())}"


@pytest.mark.parametrize("command", sorted({c for c in commands() if kind(c) == "long"}))
def test_long_commands_exist(command, capsys):
    """The harness takes minutes on a CPU: here only its entry point is checked (its --help, or
    the microbenchmark files and pytest-benchmark); the GPU test runs the command."""
    import importlib

    argv = shlex.split(command)
    if argv[0] != "pytest":
        entry = main if argv[0] == "recvit" else importlib.import_module(argv[2]).main
        with pytest.raises(SystemExit) as exit_info:
            entry(argv[1:2] + ["--help"] if argv[0] == "recvit" else ["--help"])
        assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
        return
    pytest.importorskip("pytest_benchmark")  # --benchmark-only is its option
    assert list((ROOT / argv[1]).glob("test_*.py")), f"{argv[1]} holds no pytest files"


@pytest.mark.gpu
@pytest.mark.parametrize("command", sorted({c for c in commands() if kind(c) in ("gpu", "long")}))
def test_gpu_and_long_commands_run(command, tmp_path):
    """The CUDA build installs into a throw-away venv (over the system packages), not the session's
    environment; the harness runs on a copy of benchmarks/, so its results land in tmp_path."""
    import os
    import shutil

    env = dict(os.environ)
    if kind(command) == "gpu":
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
        env["PATH"] = f"{tmp_path / 'venv' / 'bin'}{os.pathsep}{env['PATH']}"
        cwd = ROOT
    else:
        shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("results"))
        env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
        cwd = tmp_path
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("code", [b for b in blocks("python") if "cuda" in b.values[0]])
def test_gpu_python_block_runs(code, user_files):
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
