"""Where the CUDA toolkit is, for building the extension (setup.py and the JIT build).

torch guesses ``CUDA_HOME`` as the folder above ``which nvcc``; where nvcc on PATH is a wrapper
script outside ``<cuda>/bin`` (``exec /usr/local/cuda-13.0/bin/nvcc "$@"`` in /usr/local/bin) that
folder has no CUDA headers and the build fails with ``cuda_runtime_api.h: No such file or
directory``. This module imports nothing but the standard library: setup.py loads it by path.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

DEFAULT_CUDA_HOME = Path("/usr/local/cuda")


def is_cuda_home(path: Path) -> bool:
    """A CUDA toolkit root: nvcc in bin/ and the runtime's headers in include/."""
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime_api.h").is_file()


def nvcc_toolkit(nvcc: str) -> Optional[Path]:
    """The toolkit root of an nvcc, symlink or wrapper: the ``TOP`` its dry run reports."""
    try:
        result = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", result.stdout + result.stderr, re.M)
    return Path(match.group(1).strip()).resolve() if match else None


def find_cuda_home() -> tuple[Optional[Path], str]:
    """(the CUDA toolkit root, how it was found), or (None, why not).

    In order: ``CUDA_HOME`` or ``CUDA_PATH`` as set (the user's word, as torch takes it); the
    toolkit of the nvcc on PATH; /usr/local/cuda. A variable set to a folder that is not a
    toolkit is reported, not passed over.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            home = Path(os.environ[variable])
            if is_cuda_home(home):
                return home, variable
            return None, f"{variable}={home} has no bin/nvcc and include/cuda_runtime_api.h"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = Path(nvcc).resolve().parents[1]
        if is_cuda_home(home):
            return home, f"nvcc on PATH ({nvcc})"
        home = nvcc_toolkit(nvcc)
        if home is not None and is_cuda_home(home):
            return home, f"the toolkit the wrapper nvcc on PATH ({nvcc}) runs"
    if is_cuda_home(DEFAULT_CUDA_HOME):
        return DEFAULT_CUDA_HOME, f"the default {DEFAULT_CUDA_HOME}"
    if nvcc is not None:
        return None, f"no CUDA toolkit found for the nvcc on PATH ({nvcc}); set CUDA_HOME"
    return None, "nvcc not found (set CUDA_HOME)"
