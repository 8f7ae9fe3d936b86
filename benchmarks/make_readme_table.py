"""Render the README's benchmark table from a committed results file, so no number is typed by hand.

``python -m benchmarks.make_readme_table benchmarks/results/<device>/results.json`` prints the
headline table (with ``--targets``, the table of the targets the GPU numbers are held against
below it); with ``--readme README.md`` it replaces the text between the lines
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` of that file instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from recvit.bench import headline_table, targets_table

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def render(results_path: Path, relative_to: Optional[Path] = None, targets: bool = False) -> str:
    """The headline table of ``results_path`` (and its targets' table), its source, and its plots if
    present."""
    results = json.loads(Path(results_path).read_text())
    base = Path(relative_to).resolve() if relative_to else Path.cwd()
    source = Path(results_path).resolve()
    try:
        shown = source.relative_to(base)
    except ValueError:
        shown = source
    lines = [headline_table(results)] + (["", targets_table(results)] if targets else [])
    lines += ["", f"Source: `{shown.as_posix()}` (rendered by `python -m benchmarks.make_readme_table`)."]
    for plot in ("throughput.png", "speedup.png"):
        if (source.parent / plot).exists():
            lines += ["", f"![{plot[:-4]}]({(shown.parent / plot).as_posix()})"]
    return "\n".join(lines)


def replace_between_markers(text: str, table: str) -> str:
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"readme: expected the marker lines {START} and {END}, in that order")
    head, rest = text.split(START, 1)
    return head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.make_readme_table", description=__doc__)
    parser.add_argument("results", type=Path, help="a results.json written by python -m benchmarks.run")
    parser.add_argument("--readme", type=Path, help="rewrite the table between the markers of this file")
    parser.add_argument("--targets", action="store_true", help="the targets' table too (GPU results)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"results: no such file {args.results}")
    if args.readme is None:
        print(render(args.results, targets=args.targets))
        return 0
    table = render(args.results, relative_to=args.readme.parent, targets=args.targets)
    args.readme.write_text(replace_between_markers(args.readme.read_text(), table))
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
