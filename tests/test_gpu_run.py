"""benchmarks/gpu_run.sh: the dry run of every stage runs on the CPU and packs what a GPU run would
bring back; the ncu summary reads ncu's CSV."""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
STEPS = {"check": ["versions", "build", "check", "sanitize-ops", "pytest-gpu"],
         "bench": ["versions", "build", "implementations", "bench"],
         "sweep": ["versions", "build", "implementations", "sweep-scales", "sweep-fp16"],
         "profile": ["versions", "build", "torch-profiler", "ncu-triton", "ncu-cuda"]}
SHOWN = {"build", "ncu-triton", "ncu-cuda"}  # need the GPU machine: the dry run shows them


def run_script(*args, out):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


@pytest.mark.parametrize("stage", sorted(STEPS))
def test_dry_run_of_every_stage(tmp_path, stage):
    result = run_script("--dry-run", stage, out=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = (tmp_path / f"summary-{stage}.txt").read_text()
    table = {line.split()[0]: line for line in summary.splitlines()
             if line.split() and line.split()[0] in STEPS[stage]}
    assert sorted(table) == sorted(STEPS[stage]), summary
    for step, line in table.items():
        assert ("dry run: not run" if step in SHOWN else " ok ") in line, line
    with tarfile.open(tmp_path / f"gpu_run-{stage}.tar.gz") as tar:
        names = set(tar.getnames())
    run_steps = [s for s in STEPS[stage] if s not in SHOWN]
    assert {f"gpu_run-{stage}/logs/{s}.log" for s in run_steps} <= names
    assert f"gpu_run-{stage}/summary.txt" in names
    if stage in ("bench", "sweep"):
        assert any(re.search(r"benchmarks/results/.*/results\.json$", n) for n in names), names
    if stage == "profile":
        assert f"gpu_run-{stage}/profile/profile.md" in names
    if stage == "check":
        assert f"gpu_run-{stage}/check.json" in names
    # what the device tool brings back: at most 8 files, no deeper than two folders
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path).parts) <= 3 for p in files)


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
