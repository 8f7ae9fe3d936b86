"""benchmarks/gpu_run.sh: the dry run of every stage runs on the CPU and packs what a GPU run would
bring back, its plan fits one call of the device tool, and first's pytest runs no sanitizer; the
profile stage's ncu command lines are well formed and bounded; the ncu summary reads ncu's CSV;
benchmarks/gpu_results.py makes the result folder and the README's table of what `first` brings back."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
CORRECTNESS = ["versions", "build", "import-ext", "check", "pytest-gpu", "sanitize-ops", "sanitizer-probe",
               "memcheck", "racecheck", "initcheck"]
STEPS = {"first": CORRECTNESS + ["headline"],
         "check": CORRECTNESS,
         "bench": ["versions", "build", "import-ext", "implementations", "headline", "compile"],
         "sweep": ["versions", "build", "import-ext", "implementations", "sweep-scales", "train-step", "sweep-fp16"],
         "profile": ["versions", "build", "import-ext", "torch-profiler", "ncu-triton", "ncu-cuda"]}
# need the GPU machine: the dry run shows them
SHOWN = {"build", "import-ext", "sanitizer-probe", "memcheck", "racecheck", "initcheck", "ncu-triton", "ncu-cuda"}
DEVICE_CALL_S = 540  # one call of the device tool: at most 600 s, with room for the transfers


def run_script(*args, out, **variables):
    env = {key: value for key, value in os.environ.items() if key != "GPU_RUN_BUDGET_S"}  # the default
    env.update(variables, OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """dry_run(stage) -> (the finished process, its OUT folder): each stage's dry run once."""
    runs = {}

    def run(stage):
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"out-{stage}")
            runs[stage] = run_script("--dry-run", stage, out=out), out
        return runs[stage]
    return run


def step_table(summary):
    """{step: (cap, ends by, status)} from the summary's table."""
    lines = summary.split("\nstep ", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    table = {}
    for line in lines:
        name, cap, ends, _time, status = line.split(None, 4)
        table[name] = (int(cap), int(ends), status)
    return table


@pytest.mark.parametrize("stage", sorted(STEPS))
def test_dry_run_of_every_stage(dry_run, stage):
    result, out = dry_run(stage)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = (out / f"summary-{stage}.txt").read_text()
    table = step_table(summary)
    assert sorted(table) == sorted(STEPS[stage]), summary
    for step, (_cap, _ends, status) in table.items():
        assert status == ("dry run: not run" if step in SHOWN else "ok"), (step, status)
    # The plan: each step starts when others have ended (or at 0), and even if every step runs to its
    # cap, the last ends within the budget, which fits one device call.
    budget, reserve = map(int, re.search(r"budget (\d+)s, (\d+)s of it kept", summary).groups())
    assert budget <= DEVICE_CALL_S
    ends = {ends for _cap, ends, _status in table.values()}
    for step, (cap, end, _status) in table.items():
        assert end - cap == 0 or end - cap in ends, (step, cap, end)
    assert max(ends) <= budget - reserve, summary
    assert f"planned: every step ends by {max(ends)}s at the latest" in summary

    with tarfile.open(out / f"gpu_run-{stage}.tar.gz") as tar:
        names = set(tar.getnames())
    run_steps = [s for s in STEPS[stage] if s not in SHOWN]
    assert {f"gpu_run-{stage}/logs/{s}.log" for s in run_steps} <= names
    assert f"gpu_run-{stage}/logs/dry-run.log" in names
    if stage in ("first", "bench", "sweep"):
        assert any(re.search(r"/results/.*/results\.json$", n) for n in names), names
    if stage == "profile":
        assert f"gpu_run-{stage}/profile/profile.md" in names
    # what the device tool brings back: at most 8 files, no deeper than two folders
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    if stage in ("first", "check"):
        assert json.loads((out / f"check-{stage}.json").read_text())["passed"]
    if stage in ("first", "bench"):
        bench = json.loads((out / f"bench-{stage}.json").read_text())
        assert bench["complete"] and any(r["status"] == "ok" for r in bench["records"])
        assert "| packed |" in (out / f"bench-{stage}.md").read_text()


# Reads PYTEST_TIMEOUT as pytest-timeout does (as its timeout in seconds; anything else stops pytest).
PYTEST_TIMEOUT_STAND_IN = """import os


def pytest_configure(config):
    if "PYTEST_TIMEOUT" in os.environ:
        float(os.environ["PYTEST_TIMEOUT"])
"""


def test_pytest_lane_leaves_the_variables_of_pytest_alone(tmp_path):
    """pytest and its plugins read PYTEST_* variables: pytest-timeout takes PYTEST_TIMEOUT as its
    timeout. The lane exported its own '--timeout 60' under that name, so with pytest-timeout
    installed every GPU test file stopped with an INTERNALERROR (seen on the GPU machine's twin)."""
    (tmp_path / "reads_pytest_timeout.py").write_text(PYTEST_TIMEOUT_STAND_IN)  # beside a real one, if any
    (tmp_path / "out").mkdir()
    result = run_script("--dry-run", "first", out=tmp_path / "out", PYTEST_PLUGINS="reads_pytest_timeout",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "pytest-gpu: ok" in result.stdout


def test_first_runs_no_sanitizer_inside_pytest_and_no_x(dry_run):
    """first's pytest deselects the sanitizer tests (its own steps run compute-sanitizer) and runs
    file by file without -x; the sanitizers include initcheck."""
    result, out = dry_run("first")
    assert result.returncode == 0, result.stdout[-4000:]
    with tarfile.open(out / "gpu_run-first.tar.gz") as tar:
        shown = tar.extractfile("gpu_run-first/logs/dry-run.log").read().decode()
        collected = tar.extractfile("gpu_run-first/logs/pytest-gpu.log").read().decode()
    assert "pytest_file tests/test_cuda_backend.py" in shown and "--tool initcheck" in shown
    assert " -x" not in shown and "pytest -x" not in result.stdout
    assert "-m gpu and not sanitizer" in result.stdout
    ids = [line for line in collected.splitlines() if "::" in line]
    assert any("test_cuda_backend.py::" in i for i in ids)
    assert not any("sanitizer" in i for i in ids), [i for i in ids if "sanitizer" in i]


def test_unknown_stage_is_refused(tmp_path):
    result = run_script("--dry-run", "benchmark", out=tmp_path)
    assert result.returncode == 2 and "usage:" in result.stderr


# The GPU machine as the real (not dry) `first` meets it, each command answering at once: its python
# (FAKE_PYTEST: pytest's result line, FAKE_SKIPPED_FILE's every test skipped; FAKE_BUILD_FAILS; FAKE_INSTALL_FAILS: pip fails after building
# the extension in place; FAKE_ARCH_HANGS; FAKE_BENCH_FAILS),
# compute-sanitizer (FAKE_SANITIZER_REFUSES: as on gVisor) and nvidia-smi.
FAKES = {
    "python": r"""#!/usr/bin/env bash
case "$1 ${2:-}" in
    "- ") cat > /dev/null; echo "python 3.12.3, torch 2.11.0+cu130 (CUDA 13.0), GPU: NVIDIA H200 (sm_90, 132 SMs)" ;;
    "-m pip") [[ -z ${FAKE_BUILD_FAILS:-} ]] || { echo "error: nvcc failed"; exit 1; }
        echo "  recvit: building the CUDA extension for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
        echo "  g++ -shared csrc/binding.o -o build/recvit_kernels/cuda/_C.cpython-312-x86_64-linux-gnu.so"
        [[ -z ${FAKE_INSTALL_FAILS:-} ]] || { echo "ERROR: Could not install packages: Read-only file system"; exit 1; }
        echo "Successfully installed recvit-0.1.0" ;;
    "-c "*_C*) [[ -z ${FAKE_BUILD_FAILS:-} ]] || { echo "ModuleNotFoundError: No module named 'recvit_kernels.cuda._C'"; exit 1; }
        echo "/root/recvit_kernels/cuda/_C.cpython-312-x86_64-linux-gnu.so" ;;
    "-c "*get_device_capability*) [[ -z ${FAKE_ARCH_HANGS:-} ]] || exec sleep 600; echo 9.0 ;;
    "-c "*pytest_timeout*) exit 1 ;;
    "-c "*probe*) echo "probe: 12.0" ;;
    "-m pytest") [[ $3 == "${FAKE_SKIPPED_FILE:-}" ]] && FAKE_PYTEST="1 skipped, 2 deselected in 1.65s"
        [[ ${FAKE_PYTEST:-passed} == *passed* ]] && echo "$3::test_op PASSED"
        echo "========== ${FAKE_PYTEST:-2 passed, 1 skipped in 0.50s} ==========" ;;
    "-m recvit") [[ $3 == bench ]] && { echo "bench: ${FAKE_BENCH_FAILS:+no }results"; exit ${FAKE_BENCH_FAILS:-0}; }
        echo '{"passed": true}' > "${@: -1}" ;;
    "benchmarks/sanitize_ops.py "*) echo "all finite" ;;
    *) echo "fake python: unexpected $*"; exit 99 ;;
esac
""",
    "compute-sanitizer": r"""#!/usr/bin/env bash
[[ $1 == --version ]] && { echo "Compute Sanitizer"; exit; }
[[ -z ${FAKE_SANITIZER_REFUSES:-} ]] || { echo "========= Error: Device not supported"; exit 1; }
while [[ $1 == --* ]]; do shift 2; done
"$@" && echo "========= ERROR SUMMARY: 0 errors"
""",
    "nvidia-smi": """#!/usr/bin/env bash
echo "name, driver_version"; echo "NVIDIA H200, 580.159.04"
""",
}


def run_first_on_fakes(tmp_path, cuda_home=None, **fake):
    """The real `first` stage on FAKES: (the finished process, its summary, {step: status}). With
    `cuda_home`, the fake compute-sanitizer lies only in that toolkit's compute-sanitizer/ folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        folder = cuda_home / "compute-sanitizer" if cuda_home and name == "compute-sanitizer" else bin_dir
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "GPU_RUN_BUDGET_S"}
    env.update(fake, OUT=str(out), PYTHON=str(bin_dir / "python"), PATH=f"{bin_dir}:{env['PATH']}")
    if cuda_home:
        env["CUDA_HOME"] = str(cuda_home)
    result = subprocess.run(["bash", str(SCRIPT), "first"], check=False, capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)
    summary = (out / "summary-first.txt").read_text()
    assert result.stdout.endswith(f"packed into {out}: check-first.json gpu_run-first.tar.gz "
                                  "summary-first.txt \n"), result.stdout[-3000:]
    return result, summary, {step: status for step, (_c, _e, status) in step_table(summary).items()}


def test_first_on_a_working_gpu_machine(tmp_path):
    """The real (not dry) `first`: every step ok, the native architecture built for and named."""
    result, summary, steps = run_first_on_fakes(tmp_path)
    assert result.returncode == 0, summary
    assert steps == dict.fromkeys(STEPS["first"], "ok"), summary
    assert "recvit: building the CUDA extension for TORCH_CUDA_ARCH_LIST=9.0" in summary
    assert "g++" not in summary  # the link line is no import's result
    assert "tests/test_cuda_backend.py: 2 passed, 1 skipped in 0.50s\n" in summary


def test_first_finds_compute_sanitizer_in_the_toolkit(tmp_path):
    """compute-sanitizer off PATH, in <CUDA_HOME>/compute-sanitizer/ (the toolkit's layout): found,
    so the sanitizers run rather than being skipped as 'not found'."""
    if shutil.which("compute-sanitizer"):
        pytest.skip("a compute-sanitizer on this machine's PATH would be found first")
    cuda_home = tmp_path / "cuda"
    (cuda_home / "include").mkdir(parents=True)
    (cuda_home / "include" / "cuda_runtime_api.h").touch()
    result, summary, steps = run_first_on_fakes(tmp_path, cuda_home=cuda_home)
    assert f"CUDA used: CUDA_HOME={cuda_home}" in summary
    assert {tool: steps[tool] for tool in ("memcheck", "racecheck", "initcheck")} == dict.fromkeys(
        ("memcheck", "racecheck", "initcheck"), "ok"), summary


def test_first_with_every_gpu_test_skipped_is_not_ok(tmp_path):
    """A pytest run with every selected test skipped (CUDA not visible, say) tested nothing: each
    file says so, pytest-gpu is not ok, and the run fails."""
    result, summary, steps = run_first_on_fakes(tmp_path, FAKE_PYTEST="3 skipped, 35 deselected in 2.87s")
    assert result.returncode == 1
    assert steps["pytest-gpu"] == "failed: see the files below (exit 1)", summary
    assert "no GPU test passed in any file: nothing was tested\n" in summary
    assert "tests/test_cuda_backend.py: 3 skipped, 35 deselected in 2.87s: nothing tested\n" in summary


def test_first_with_one_file_of_skipped_tests_is_ok(tmp_path):
    """One file whose every GPU test skipped (a test of two GPUs on one) is named, not a failure."""
    result, summary, steps = run_first_on_fakes(tmp_path, FAKE_SKIPPED_FILE="tests/test_triton_device.py")
    assert result.returncode == 0 and steps["pytest-gpu"] == "ok", summary
    assert "tests/test_triton_device.py: 1 skipped, 2 deselected in 1.65s: nothing tested\n" in summary
    assert "tests/test_cuda_backend.py: 2 passed, 1 skipped in 0.50s\n" in summary


@pytest.mark.parametrize("fake, expected", [
    ("FAKE_BUILD_FAILS", {"build": "failed (exit 1)", "import-ext": "failed (exit 1)"}),
    ("FAKE_INSTALL_FAILS", {"build": "failed (exit 1)"}),
    ("FAKE_SANITIZER_REFUSES", {"sanitizer-probe": "refused (exit 1)"} | {
        tool: "skipped: compute-sanitizer cannot run here (logs/sanitizer-probe.log)"
        for tool in ("memcheck", "racecheck", "initcheck")}),
    ("FAKE_BENCH_FAILS", {"headline": "failed (exit 1)"}),
])
def test_first_reports_each_failure_once_and_runs_on(tmp_path, fake, expected):
    """A failed build, a pip that fails after building the extension in place (which still
    imports), a runtime that refuses compute-sanitizer (gVisor), a failed headline: each is marked
    in the table, the end of its log shown once, and the other steps still run."""
    result, summary, steps = run_first_on_fakes(tmp_path, **{fake: "1"})
    assert result.returncode == (0 if fake == "FAKE_SANITIZER_REFUSES" else 1)
    assert steps == dict.fromkeys(STEPS["first"], "ok") | expected, summary
    failed = next(step for step in expected if "skipped" not in expected[step])
    assert summary.count(f"--- {failed} (") == 1, summary
    unavailable = "the cuda backend is unavailable after it (no JIT build)" in summary
    assert unavailable == (fake == "FAKE_BUILD_FAILS"), summary


def test_first_when_cuda_hangs_at_start_builds_for_a100_and_h100(tmp_path):
    """Where asking torch for the GPU's architecture hangs, the build is for 8.0;9.0 within seconds
    rather than never."""
    result, summary, steps = run_first_on_fakes(tmp_path, FAKE_ARCH_HANGS="1")
    assert result.returncode == 0 and steps["build"] == "ok", summary
    assert "TORCH_CUDA_ARCH_LIST=8.0;9.0" in summary


NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","123","python3","127.0.0.1","_varlen_attention_kernel","1","7","(128, 1, 1)","(4, 12, 8)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","2,000,000"
"0","123","python3","127.0.0.1","_varlen_attention_kernel","1","7","(128, 1, 1)","(4, 12, 8)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","1,000,000"
"0","123","python3","127.0.0.1","_varlen_attention_kernel","1","7","(128, 1, 1)","(4, 12, 8)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","1,500"
"0","123","python3","127.0.0.1","_varlen_attention_kernel","1","7","(128, 1, 1)","(4, 12, 8)","0","9.0","Command line profiler metrics","sm__throughput.avg.pct_of_peak_sustained_elapsed","%","40.5"
"1","123","python3","127.0.0.1","_varlen_attention_kernel","1","7","(128, 1, 1)","(4, 12, 8)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","1000000"
"1","123","python3","127.0.0.1","_varlen_attention_kernel","1","7","(128, 1, 1)","(4, 12, 8)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","0"
"1","123","python3","127.0.0.1","_varlen_attention_kernel","1","7","(128, 1, 1)","(4, 12, 8)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","500"
"1","123","python3","127.0.0.1","_varlen_attention_kernel","1","7","(128, 1, 1)","(4, 12, 8)","0","9.0","Command line profiler metrics","sm__throughput.avg.pct_of_peak_sustained_elapsed","%","20.5"
==PROF== Disconnected from process 123
'''


def test_ncu_summary_reads_ncu_csv(tmp_path):
    from benchmarks.profile_forward import ncu_summary

    path = tmp_path / "ncu-triton.csv"
    path.write_text(NCU_CSV)
    lines = ncu_summary([path])
    # two launches: 2000 ns, 4 MB moved -> 2000 GB/s; SM throughput averaged
    assert "| `_varlen_attention_kernel` | 2 | 2.0 | 2000 | 30.5 |" in lines
    empty = tmp_path / "ncu-cuda.csv"
    empty.write_text("==ERROR== the profiler failed\n")
    assert any("no ncu CSV rows" in line for line in ncu_summary([empty]))


def shown_steps(out, stage, how="dry run, not run"):
    """{step: its words} of the steps the dry run showed rather than ran (logs/dry-run.log); with
    how="on the GPU", of the GPU commands of the steps it ran as toys."""
    with tarfile.open(out / f"gpu_run-{stage}.tar.gz") as tar:
        shown = tar.extractfile(f"gpu_run-{stage}/logs/dry-run.log").read().decode()
    found = {}
    for line in shown.splitlines():
        match = re.match(rf"== (\S+) \({how}\): (.*)", line)
        if match:
            found[match.group(1)] = shlex.split(match.group(2))
    return found


# the steps the dry run runs as toys in place of their GPU commands
TOYS = {"first": {"check", "headline"}, "check": {"check"}, "bench": {"headline", "compile"},
        "sweep": {"sweep-scales", "train-step", "sweep-fp16"}, "profile": {"torch-profiler"}}


@pytest.mark.parametrize("stage", sorted(STEPS))
def test_gpu_commands_of_every_stage_parse(dry_run, stage, monkeypatch):
    """Each step the dry run times as a toy has its GPU command line in dry-run.log, and that line is
    taken by its program's parser as the GPU run gives it (recvit bench's settings checked as on a
    GPU: the implementations, batch and image sizes), so that a GPU session meets no usage error."""
    import torch

    from benchmarks import profile_forward, train_step
    from recvit import bench
    from recvit.cli import _build_parser

    result, out = dry_run(stage)
    assert result.returncode == 0, result.stdout[-4000:]
    commands = shown_steps(out, stage, "on the GPU")
    assert set(commands) == TOYS[stage]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, words in commands.items():
        assert words[:2] == [sys.executable, "-m"], words
        module, args = words[2], words[3:]
        if module == "recvit" and args[0] == "bench":
            settings = bench.settings_from_args(bench.cli._parser().parse_args(args[1:]))
            assert settings.device == "cuda" and "--full" in args and "--cpu" not in args
        elif module == "recvit":
            assert _build_parser().parse_args(args).device == "cuda"
        elif module == "benchmarks.train_step":
            train_step._parser().parse_args(args)
        else:
            assert module == "benchmarks.profile_forward", words
            assert profile_forward._parser().parse_args(args).device == "cuda"


def test_profile_stage_ncu_commands_are_well_formed_and_bounded(dry_run):
    """Each ncu line: counters only between the program's cudaProfilerStart/Stop (one warmed-up
    forward), at most a few hundred kernel launches (a Base batch-8 triton forward launches about
    150), the clocks left alone, the metrics the summary reads, CSV into the log folder that
    ncu-summary globs; the program's own arguments are profile_forward's, one implementation on cuda;
    each step capped well inside the budget."""
    from benchmarks.profile_forward import NCU_METRICS, _parser

    result, out = dry_run("profile")
    assert result.returncode == 0, result.stdout[-4000:]
    shown = shown_steps(out, "profile")
    caps = step_table((out / "summary-profile.txt").read_text())
    for impl in ("triton", "cuda"):
        words = shown[f"ncu-{impl}"]
        assert words[0] == "ncu", words
        program = words.index(sys.executable)
        assert words[1:program].count("--csv") == 1, words  # the one option without a value
        rest = [w for w in words[1:program] if w != "--csv"]
        options = dict(zip(rest[::2], rest[1::2]))
        assert sorted(options) == ["--clock-control", "--launch-count", "--log-file", "--metrics",
                                   "--profile-from-start"], options
        assert options["--profile-from-start"] == "off" and options["--clock-control"] == "none"
        assert 150 <= int(options["--launch-count"]) <= 1000
        assert tuple(options["--metrics"].split(",")) == NCU_METRICS
        assert options["--log-file"].endswith(f"/gpu_run-profile/logs/ncu-{impl}.csv")
        assert words[program + 1:program + 3] == ["-m", "benchmarks.profile_forward"]
        args = _parser().parse_args(words[program + 3:])
        assert args.ncu and args.device == "cuda" and args.implementations == [impl] and args.batch >= 1
        cap, _ends, status = caps[f"ncu-{impl}"]
        assert status == "dry run: not run" and cap <= 120


def test_gpu_results_from_the_dry_run_of_first(dry_run, tmp_path, capsys):
    """What `first` brings back (here its dry run's files) becomes RESULTS/<device>/ with the JSON,
    the report, the plots, the summary and the check, the commit filled in; the README's table between
    its markers is rendered from that JSON, the targets' table with it, the rest of the README kept."""
    from benchmarks.gpu_results import main as gpu_results
    from recvit.bench import device_slug
    from recvit.bench.report import TARGETS

    result, out = dry_run("first")
    assert result.returncode == 0, result.stdout[-4000:]
    readme = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", readme)
    results_root = tmp_path / "benchmarks" / "results"
    assert gpu_results([str(out), "--commit", "0123abc", "--results", str(results_root),
                        "--readme", str(readme)]) == 0
    bench = json.loads((out / "bench-first.json").read_text())
    folder = results_root / device_slug(bench["device"])
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "results.json", "results.md", "throughput.png", "latency.png", "speedup.png", "summary.txt", "check.json"])
    results = json.loads((folder / "results.json").read_text())
    assert results["device"]["git_commit"] == "0123abc" and results["device"]["git_dirty"] is None
    assert results["records"] == bench["records"]
    assert (folder / "summary.txt").read_text() == (out / "summary-first.txt").read_text()
    assert json.loads((folder / "check.json").read_text())["passed"]
    assert all((folder / plot).stat().st_size > 1000 for plot in ("throughput.png", "latency.png", "speedup.png"))
    assert "## Targets" in (folder / "results.md").read_text()

    text, original = readme.read_text(), (ROOT / "README.md").read_text()
    start, end = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
    assert text.split(start)[0] == original.split(start)[0] and text.split(end)[1] == original.split(end)[1]
    table = text.split(start)[1].split(end)[0]
    assert "commit 0123abc" in table and "| packed |" in table
    assert f"Source: `benchmarks/results/{folder.name}/results.json`" in table
    packed = next(r for r in bench["records"] if r["implementation"] == "packed" and r["batch"] == 2)
    for target in TARGETS[:2] + TARGETS[3:4]:  # DeiT, ToMe, the reference: all timed in the dry run
        value, low, high = (packed[f"speedup_{target.label}{s}"] for s in ("", "_p10", "_p90"))
        cell = f"{value:.2f}x ({low:.2f}-{high:.2f}) " + ("met" if value >= target.at_least else "not met")
        assert f"| {target.what} @ b=2 | >= {target.at_least:.2f}x | {cell}" in table, (cell, table)
    assert "| p50 latency vs DeiT, CUDA graph on both sides (latency <= 1.0x) @ b=1 |" in table
    assert "this run is not that one" in table  # a CPU's toy run, not the targets' GPU run
    assert f"wrote {folder}" in capsys.readouterr().out

    # again, from a run that recorded its commit (RECVIT_COMMIT) and has no check: none stays behind
    again = tmp_path / "again"
    again.mkdir()
    summary = (out / "summary-first.txt").read_text()
    assert ", commit unknown (set RECVIT_COMMIT)" in summary
    (again / "summary-first.txt").write_text(summary.replace(", commit unknown (set RECVIT_COMMIT)",
                                                             ", commit 4567def"))
    bench["device"]["git_commit"] = "unknown"  # as on the device machine: no .git there
    (again / "bench-first.json").write_text(json.dumps(bench))
    assert gpu_results([str(again), "--results", str(results_root), "--readme", str(readme)]) == 0
    assert json.loads((folder / "results.json").read_text())["device"]["git_commit"] == "4567def"
    assert not (folder / "check.json").exists()


@pytest.mark.parametrize("case, message", [
    ("no folder", "folder: no such folder"),
    ("no bench", "bench-first.json: no such file"),
    ("truncated bench", "bench-first.json: not a JSON file (cut off while written?): "),
    ("no commit", "the run recorded no commit (RECVIT_COMMIT was not set): pass --commit"),
    ("bad commit", "argument --commit: expected a hexadecimal git commit"),
    ("no markers", "readme: expected the marker lines"),
])
def test_gpu_results_refuses_before_writing(case, message, tmp_path, capsys):
    from benchmarks.gpu_results import main as gpu_results

    run = tmp_path / "files_at"
    run.mkdir()
    (run / "summary-first.txt").write_text("gpu_run.sh first on host, 2026-12-01T00:00:00Z, commit unknown "
                                           "(set RECVIT_COMMIT)\n")
    if case != "no bench":
        bench = json.dumps({"device": {"git_commit": "unknown"}})
        (run / "bench-first.json").write_text(bench[:-5] if case == "truncated bench" else bench)
    readme = tmp_path / "README.md"
    readme.write_text("no table here\n" if case == "no markers"
                      else "<!-- bench-table:start -->\n<!-- bench-table:end -->\n")
    argv = [str(tmp_path / "nowhere" if case == "no folder" else run), "--results", str(tmp_path / "results"),
            "--readme", str(readme)] + (["--commit", "HEAD~1"] if case == "bad commit" else [])
    with pytest.raises(SystemExit) as exit_info:
        gpu_results(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()
