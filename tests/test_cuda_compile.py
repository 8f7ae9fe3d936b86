"""CI (CPU) check of the CUDA sources: csrc/check_compile.sh compiles every kernel for sm_80 and
sm_90 with this machine's nvcc and syntax-checks the binding against torch's headers."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "csrc" / "check_compile.sh"
KERNELS = sorted(path.name for path in SCRIPT.parent.glob("*.cu"))


def nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    fallback = f"{home}/bin/nvcc"
    return shutil.which("nvcc") or (fallback if os.access(fallback, os.X_OK) else None)


def test_every_kernel_source_is_checked():
    from recvit_kernels.cuda import SOURCES

    assert KERNELS == sorted(name for name in SOURCES if name.endswith(".cu"))
    assert KERNELS == ["depth_sort.cu", "layer_norm.cu", "linear_epilogue.cu", "prefix_linear.cu",
                       "varlen_attention.cu"]


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found")
def test_kernels_compile_for_sm80_and_sm90():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in KERNELS:
        assert f"ok     {name} (sm_80, sm_90)" in result.stdout, result.stdout
    assert "FAILED" not in result.stdout


def test_missing_nvcc_is_a_clear_skip():
    env = dict(os.environ, NVCC="/nonexistent/nvcc")
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0
    assert "SKIPPED" in result.stdout and "not compile-checked" in result.stdout
