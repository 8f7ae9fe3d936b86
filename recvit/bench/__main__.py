"""``python -m recvit.bench``: the same as ``recvit bench``."""
import sys

from .cli import main

sys.exit(main())
