"""``find_cuda_home`` (setup.py and the JIT build): which CUDA toolkit the extension is built with,
on fake toolkit layouts (nvcc on PATH as a wrapper script, a symlink, none; CUDA_HOME set)."""
import os
import stat

import pytest

from recvit_kernels.cuda import toolkit


def executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_toolkit(root):
    """A toolkit root whose nvcc, like the real one, names its root in a dry run (on stderr)."""
    executable(root / "bin" / "nvcc", f'#!/bin/sh\necho "#$ TOP={root}/bin/.." >&2\n')
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No CUDA_HOME or CUDA_PATH, an empty PATH and no /usr/local/cuda: each test adds its own."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    (tmp_path / "path").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.setattr(toolkit, "DEFAULT_CUDA_HOME", tmp_path / "no-cuda")
    return tmp_path


def test_wrapper_script_on_path_finds_the_toolkit_it_runs(clean_env):
    """nvcc on PATH is ``exec <cuda>/bin/nvcc "$@"`` in another folder (torch's guess, the folder
    above it, has no CUDA headers): the toolkit is the one the wrapper runs."""
    home = fake_toolkit(clean_env / "cuda-13.0")
    wrapper = executable(clean_env / "path" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    found, how = toolkit.find_cuda_home()
    assert found == home.resolve()
    assert "wrapper" in how and str(wrapper) in how


def test_symlink_on_path_finds_its_target_toolkit(clean_env):
    home = fake_toolkit(clean_env / "cuda-12.8")
    (home / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")  # no dry run needed for a symlink
    os.symlink(home / "bin" / "nvcc", clean_env / "path" / "nvcc")
    found, how = toolkit.find_cuda_home()
    assert found == home.resolve() and how.startswith("nvcc on PATH")


def test_cuda_home_is_taken_as_set_and_checked(clean_env, monkeypatch):
    fake_toolkit(clean_env / "cuda-13.0")
    executable(clean_env / "path" / "nvcc", f'#!/bin/sh\nexec {clean_env}/cuda-13.0/bin/nvcc "$@"\n')
    chosen = fake_toolkit(clean_env / "chosen")
    monkeypatch.setenv("CUDA_HOME", str(chosen))
    assert toolkit.find_cuda_home() == (chosen, "CUDA_HOME")
    monkeypatch.setenv("CUDA_HOME", str(clean_env / "path"))
    found, why = toolkit.find_cuda_home()
    assert found is None
    assert why == f"CUDA_HOME={clean_env / 'path'} has no bin/nvcc and include/cuda_runtime_api.h"
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("CUDA_PATH", str(chosen))
    assert toolkit.find_cuda_home() == (chosen, "CUDA_PATH")


def test_default_location_then_a_clear_reason(clean_env, monkeypatch):
    assert toolkit.find_cuda_home() == (None, "nvcc not found (set CUDA_HOME)")
    nvcc = executable(clean_env / "path" / "nvcc", "#!/bin/sh\nexit 1\n")  # names no toolkit
    assert toolkit.find_cuda_home() == (
        None, f"no CUDA toolkit found for the nvcc on PATH ({nvcc}); set CUDA_HOME")
    default = fake_toolkit(clean_env / "usr-local-cuda")
    monkeypatch.setattr(toolkit, "DEFAULT_CUDA_HOME", default)
    assert toolkit.find_cuda_home() == (default, f"the default {default}")
