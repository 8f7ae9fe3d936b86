"""``python -m recvit``: the ``recvit`` command line."""
from .cli import main

raise SystemExit(main())
