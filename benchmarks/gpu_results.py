"""What a GPU run brought back, made into a committed result folder and the README's table.

    python -m benchmarks.gpu_results FOLDER [--stage first] [--commit SHA]
                                     [--results benchmarks/results] [--readme README.md]

FOLDER holds the files ``bash benchmarks/gpu_run.sh STAGE`` left in ``$OUT`` (the device tool's
``files_at``): ``summary-STAGE.txt``, ``bench-STAGE.json`` (and ``.md``), ``check-STAGE.json``,
``gpu_run-STAGE.tar.gz``. Written to ``RESULTS/<device>/`` (the folder ``recvit bench --out``
names, ``nvidia-h200`` for the H200): ``results.json`` (the headline benchmark, its commit filled
in: the device machine's copy has no ``.git``, so the run records ``RECVIT_COMMIT`` in its summary),
``results.md`` (the whole report, the targets included), ``throughput.png``, ``latency.png``,
``speedup.png``, ``summary.txt`` (the run's versions, its steps and their results) and, where the
run checked, ``check.json`` (``recvit check``'s table). Then the README's table between its markers
is rendered from that ``results.json`` with the targets' table (:mod:`benchmarks.make_readme_table`).
The tarball (every step's log) is not committed: read it for the failures.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from recvit.bench import device_slug, targets_table, write_results

from .make_readme_table import render, replace_between_markers

ROOT = Path(__file__).resolve().parents[1]
COMMIT = re.compile(r"^gpu_run\.sh \S+.*, commit (\S+)", re.M)
WRITTEN = ("results.json", "results.md", "throughput.png", "latency.png", "speedup.png", "summary.txt",
           "check.json")


def run_commit(summary: str) -> Optional[str]:
    """The commit the summary's first line records (``RECVIT_COMMIT``); None where it says unknown."""
    match = COMMIT.search(summary)
    return match.group(1) if match and match.group(1) != "unknown" else None


def read_run(folder: Path, stage: str, commit: Optional[str]) -> tuple[str, dict]:
    """The run's summary and its headline results, the commit filled in; ValueError naming the file
    when one that is needed is missing or says too little."""
    summary_path, bench_path = folder / f"summary-{stage}.txt", folder / f"bench-{stage}.json"
    for path in (summary_path, bench_path):
        if not path.is_file():
            raise ValueError(f"{path}: no such file (the run's summary and its headline benchmark are needed; "
                             f"is {folder} the device tool's files_at of a `gpu_run.sh {stage}` call?)")
    summary = summary_path.read_text()
    try:
        results = json.loads(bench_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{bench_path}: not a JSON file (cut off while written?): {error}") from None
    device = results["device"]
    recorded = device["git_commit"] if device["git_commit"] != "unknown" else None
    commit = commit or run_commit(summary) or recorded
    if commit is None:
        raise ValueError(f"{summary_path}: the run recorded no commit (RECVIT_COMMIT was not set): pass --commit")
    if commit != recorded:  # the device's copy: no .git, so neither the commit nor a dirty tree is known there
        device.update(git_commit=commit, git_dirty=None)
    return summary, results


def collect(folder: Path, stage: str, results: dict, results_root: Path) -> Path:
    """Write the result folder of ``results`` and the run's files in ``folder``; returns it."""
    target = results_root / device_slug(results["device"])
    for name in WRITTEN:  # no file of an earlier run stays beside this one's
        (target / name).unlink(missing_ok=True)
    written = write_results(results, results_root, plots=True)
    shutil.copyfile(folder / f"summary-{stage}.txt", written / "summary.txt")
    check = folder / f"check-{stage}.json"
    if check.is_file():
        shutil.copyfile(check, written / "check.json")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_results", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the files gpu_run.sh left in $OUT (the device tool's files_at)")
    parser.add_argument("--stage", default="first", choices=("first", "bench"),
                        help="the gpu_run.sh stage that ran (the ones with a headline benchmark)")
    parser.add_argument("--commit", help="the commit the run ran (default: the summary's RECVIT_COMMIT)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                        help="results root: the folder is RESULTS/<device>/")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md",
                        help="the file whose table between the bench-table markers is rendered")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"folder: no such folder {args.folder}")
    if args.commit is not None and not re.fullmatch(r"[0-9a-f]{7,40}", args.commit):
        parser.error(f"argument --commit: expected a hexadecimal git commit, got {args.commit!r}")
    if not args.readme.is_file():
        parser.error(f"argument --readme: no such file {args.readme}")
    try:
        readme = args.readme.read_text()
        replace_between_markers(readme, "")  # the markers are there: checked before anything is written
        _summary, results = read_run(args.folder, args.stage, args.commit)
    except ValueError as error:
        parser.error(str(error))
    folder = collect(args.folder, args.stage, results, args.results)
    table = render(folder / "results.json", relative_to=args.readme.parent, targets=True)
    args.readme.write_text(replace_between_markers(readme, table))
    print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    print(f"updated the table of {args.readme}" + ("" if results["complete"] else
                                                   " (from a partial run: the benchmark was stopped)"))
    print()
    print(targets_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
