"""benchmarks/gpu_run.sh: the dry run of every stage runs on the CPU and packs what a GPU run would
bring back, its plan fits one call of the device tool, and first's pytest runs no sanitizer; the
ncu summary reads ncu's CSV."""
import json
import os
import re
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


def run_script(*args, out):
    env = {key: value for key, value in os.environ.items() if key != "GPU_RUN_BUDGET_S"}  # the default
    env.update(OUT=str(out), PYTHON=sys.executable)
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
