"""Every code block of the README runs as written.

``python`` blocks are executed. The commands of a ``bash`` block run in order, in one temporary
directory (a later command may use what an earlier one wrote): ``recvit ...`` commands through
``recvit.cli.main`` (the console script and ``python -m recvit`` call the same function, see
test_cli.py); ``python -c`` commands in a subprocess; the set-up and test commands must be the ones
``.ci/run`` runs; the CUDA build's commands install and need the network, so no test runs them on
any machine: bash runs each as written with a stand-in ``pip`` that records the arguments and
environment it was given; the benchmark harness and ``recvit check`` (minutes) have their own
arguments checked by their parsers and run here in their tiniest CPU form (``benchmarks/gpu_run.sh``
runs them on a GPU); ``torchrun ... -m recvit train``
lines (templates that need the user's data set and GPUs) must be accepted by the training parser.
Each block runs in an empty temporary directory. A block that needs the user's own files is a
template, marked in the README by ``<!-- template, needs: NAME ... -->`` on the line before it; the
test builds stand-ins for the names it knows first: ``photo.png`` (a non-square picture) and
``public_run/`` (a public Edge-RecViT checkpoint directory). A block or command that fits none of
these, or a template naming another file, fails the test.
"""
import itertools
import json
import os
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
TEMPLATE = re.compile(r"^<!-- template, needs: (.+?) -->\n```\w*\n(.*?)^```", re.S | re.M)
LONG = ("recvit bench", "python -m benchmarks.run", "pytest benchmarks/",  # minutes on a CPU
        "recvit check")  # run in full by test_check.py and .ci/run
GPU_BUILD = ("pip install setuptools>=64 wheel ninja", "TORCH_CUDA_ARCH_LIST=")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")  # NAME=value before a command


def blocks(language):
    text = (ROOT / "README.md").read_text()
    found = []
    for match in BLOCK.finditer(text):
        if match.group(1) == language:
            line = text.count("\n", 0, match.start()) + 1
            found.append(pytest.param(match.group(2), id=f"line{line}"))
    return found


def block_commands(block):
    """The commands of a bash block, each as its words: continuations joined, comments dropped,
    '&&' chains split."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            found.append(words[:end])
            words = words[end + 1:]
    return found


def shell_line(words):
    """The words as one bash command line that bash splits back into the same words: each word
    quoted, a leading NAME=value in its value only, so that it stays an assignment for the command."""
    parts, leading = [], True
    for word in words:
        match = ASSIGNMENT.match(word) if leading else None
        leading = match is not None
        parts.append(match.group(0) + shlex.quote(word[match.end():]) if match else shlex.quote(word))
    return " ".join(parts)


def commands():
    """Every bash command of the README as one normalised line."""
    return [" ".join(words) for param in blocks("bash") for words in block_commands(param.values[0])]


def kind(command):
    if command.startswith(LONG):
        return "long"
    if command.startswith(GPU_BUILD):
        return "gpu-build"
    if command.startswith("recvit ") or command == "recvit":
        return "cli"
    if command.startswith("python -c "):
        return "python"
    if command.startswith("torchrun "):
        return "torchrun"
    return "ci"


def ci_commands():
    """.ci/run's commands, normalised as a user types them (no python -m pip, no --quiet)."""
    lines = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ").splitlines()
    found = set()
    for line in lines:
        command = " ".join(part for part in shlex.split(line, comments=True) if part != "--quiet")
        found.add(command.replace("python -m pip ", "pip ", 1))
    return found


def _photo(folder):
    import matplotlib.image

    y, x = np.mgrid[0:60, 0:80] / 80.0
    matplotlib.image.imsave(folder / "photo.png", np.stack([x, y, 1 - x], -1))


def _public_run(folder):
    from test_public_checkpoint import write_checkpoint

    (folder / "public_run").mkdir()
    write_checkpoint(folder / "public_run")


USER_FILES = {"photo.png": _photo, "public_run/": _public_run}


def build_user_files(code, folder):
    """Stand-ins for the user's files a template block names (nothing for an ordinary block)."""
    templates = {body: names.split() for names, body in TEMPLATE.findall((ROOT / "README.md").read_text())}
    for name in templates.get(code, ()):
        assert name in USER_FILES, f"the README template names {name!r}; the test knows {sorted(USER_FILES)}"
        USER_FILES[name](folder)


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """An empty working directory; build_user_files puts a template's files in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_code_blocks():
    assert len(blocks("python")) >= 2 and len(commands()) >= 8
    assert [b for b in blocks("python") if "cuda" in b.values[0]]  # test_gpu_python_block_runs has one


@pytest.mark.parametrize("code", [b for b in blocks("python") if "cuda" not in b.values[0]])
def test_python_block_runs(code, user_files):
    build_user_files(code, user_files)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("block", [b for b in blocks("bash") if any(
    kind(" ".join(words)) in ("cli", "python") for words in block_commands(b.values[0]))])
def test_bash_block_runs(block, user_files, capsys):
    build_user_files(block, user_files)
    for words in block_commands(block):
        command = " ".join(words)
        if kind(command) == "cli":
            try:
                code = main(words[1:])
            except SystemExit as exit_info:  # --version, or a usage error
                code = exit_info.code
            out = capsys.readouterr()
            assert code == 0, f"{command}: {out.err}"
            assert out.out, command
        elif kind(command) == "python":
            done = subprocess.run([sys.executable, *words[1:]], cwd=user_files, capture_output=True, text=True)
            assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"


@pytest.mark.parametrize("command", [c for c in commands() if kind(c) == "torchrun"])
def test_torchrun_templates_parse(command):
    """The multi-GPU recipes need the user's data set: their arguments must be the trainer's."""
    from recvit.training.train import _parser

    argv = shlex.split(command)
    module = argv.index("-m")
    assert argv[module + 1:module + 3] == ["recvit", "train"], command
    _parser().parse_args(argv[module + 3:])


@pytest.mark.parametrize("command", [c for c in commands() if kind(c) == "ci"])
def test_setup_and_test_commands_are_what_ci_runs(command):
    assert command in ci_commands(), f"README command {command!r} is not run by .ci/run: {sorted(ci_commands())}"


# The tiniest CPU form of each long command: the README's words, then these, which narrow it to
# seconds (argparse keeps the last value of an option given twice).
TINY_BENCH = ["--cpu", "--scales", "tiny", "--dtypes", "fp32", "--img-sizes", "32", "--batch-sizes", "1",
              "--profiles", "paper", "--implementations", "deit-dense", "packed", "--target-s", "0",
              "--min-rounds", "1", "--threads", "1", "--no-progress", "--no-plots"]
TINY = {"recvit bench": TINY_BENCH, "python -m benchmarks.run": TINY_BENCH,
        "recvit check": ["--device", "cpu", "--only", "depth_sort", "--dtypes", "fp32"],
        "pytest benchmarks/": ["-k", "test_depth_sort and packed", "-q", "-p", "no:cacheprovider",
                               "--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off"]}


@pytest.mark.parametrize("command", sorted({c for c in commands() if kind(c) == "long"}))
def test_long_commands_parse_and_run_their_tiniest_form(command, tmp_path, monkeypatch, capsys):
    """The harness takes minutes on a CPU (benchmarks/gpu_run.sh runs it on a GPU): here each README
    command's own arguments are checked by its parser, then the command runs in its tiniest CPU form
    (its words, then TINY's), so that no GPU session meets a usage error in it."""
    import importlib

    from recvit import bench

    argv = shlex.split(command)
    prefix = next(p for p in TINY if command.startswith(p))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where --full writes without --out
    if argv[0] == "pytest":
        pytest.importorskip("pytest_benchmark")  # --benchmark-only is its option
        done = subprocess.run([sys.executable, "-m", *argv, *TINY[prefix]], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0 and "\n1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
        return
    if argv[0] == "recvit":
        entry, own = main, argv[1:]
    else:
        entry, own = importlib.import_module(argv[2]).main, argv[3:]
    if prefix != "recvit check":  # the bench's own arguments, checked as a GPU run would take them
        options = bench.cli._parser().parse_args(own[1:] if argv[0] == "recvit" else ["--full", *own])
        bench.settings_from_args(options)
    assert entry([*own, *TINY[prefix]]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert (" passed, 0 failed" if prefix == "recvit check" else "| packed |") in out, out[-3000:]
    if "--full" in command or argv[0] == "python":
        assert list(tmp_path.glob("recvit/bench/*/results.json"))


@pytest.mark.parametrize("words", [words for param in blocks("bash") for words in block_commands(param.values[0])
                                   if kind(" ".join(words)) == "gpu-build"], ids=" ".join)
def test_cuda_build_commands_reach_pip_as_written(words, tmp_path):
    """bash runs the command as the README writes it (shell_line keeps the quoting of
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"), with a stand-in pip first on PATH: pip gets the README's
    arguments, and the variables set before it, their values. Nothing is installed."""
    record = tmp_path / "pip.json"
    pip = tmp_path / "bin" / "pip"
    pip.parent.mkdir()
    pip.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                   f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n")
    pip.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "TORCH_CUDA_ARCH_LIST"}
    env["PATH"] = f"{pip.parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", "-c", shell_line(words)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    given = json.loads(record.read_text())
    settings = [word.split("=", 1) for word in itertools.takewhile(ASSIGNMENT.match, words)]
    assert words[len(settings)] == "pip" and given["argv"] == words[len(settings) + 1:], given["argv"]
    for name, value in settings:
        assert given["env"][name] == value


@pytest.mark.gpu
@pytest.mark.parametrize("code", [b for b in blocks("python") if "cuda" in b.values[0]])
def test_gpu_python_block_runs(code, user_files):
    build_user_files(code, user_files)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


SWAP = re.compile(r'create_model\("(\w+)"[^\n]*?# or ([\w /]+)$', re.M)


def suggested_swaps():
    """(block, model named, model the comment suggests instead) for every `create_model("x", ...)  # or y / _z`
    line of a python block; `_z` is the first name's family with that size."""
    found = []
    for param in blocks("python"):
        for named, alternatives in SWAP.findall(param.values[0]):
            names = [name.strip() for name in alternatives.split("/")]
            family = names[0].rsplit("_", 1)[0]
            for name in names:
                swapped = family + name if name.startswith("_") else name
                found.append(pytest.param(param.values[0], named, swapped, id=f"{param.id}-{swapped}"))
    return found


def test_the_readme_suggests_swaps():
    assert len(suggested_swaps()) >= 4  # the API block's Edge-RecViT sizes and the MoR-ViT block's


@pytest.mark.parametrize("code, named, swapped", suggested_swaps())
def test_suggested_swap_runs(code, named, swapped, user_files):
    """A model the README's comments offer in place of the block's runs the block as written."""
    from recvit import list_models

    assert swapped in list_models(), swapped
    build_user_files(code, user_files)
    exec(compile(code.replace(f'"{named}"', f'"{swapped}"'), "README.md", "exec"), {"__name__": "__readme__"})
