"""The one benchmark command: ``python -m benchmarks.run [--cpu] [--out benchmarks/results]``.

Runs the whole harness of :mod:`recvit.bench` (the same as ``recvit bench --full``) on the present
device (``--cpu``: the CPU mode even where a GPU is present) and writes ``results.json``,
``results.md`` and PNG plots to ``<out>/<device>/``; without ``--out`` to
``~/.cache/recvit/bench/<device>/`` (``$XDG_CACHE_HOME``), outside the source tree: pass
``--out benchmarks/results`` for results meant to be committed. Every other ``recvit bench``
option passes through (``--scales``, ``--batch-sizes``, ``--implementations``, ...; see ``--help``).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from recvit import bench


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return bench.main(["--full", *argv])


if __name__ == "__main__":
    sys.exit(main())
