"""What a run measures (:class:`Settings`, the defaults per device) and the record of where it ran
(:func:`device_info`: device, driver, versions, commit)."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .profiles import PROFILES

SCALES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a user compares ours against, and ours, in the quick run (`recvit bench`).
QUICK_CPU = ["deit-dense", "tome", "reference", "packed", "triton", "cuda", "early-exit-packed"]
QUICK_GPU = ["deit-dense", "deit-dense+graph", "tome", "tome+graph", "reference", "packed", "packed+graph",
             "triton", "triton+graph", "cuda", "cuda+graph", "early-exit-cuda+graph"]


@dataclass
class Settings:
    device: str
    scales: list[str]
    dtypes: list[str]
    img_sizes: list[int]
    batch_sizes: list[int]          # throughput sweep, for the headline profile
    profiles: list[str]
    profile_batch_sizes: list[int]  # the other profiles are timed at these batches only
    latency_batches: list[int] = field(default_factory=lambda: [1, 8])
    implementations: Optional[list[str]] = None  # None: all
    headline_profile: str = "paper"
    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 200
    target_s: float = 0.5
    latency_repeats: int = 100      # min repeats at the latency batches (p99 needs many)
    rotate: int = 4                 # pre-made input batches cycled through
    seed: int = 0
    force_compile: bool = False
    threads: Optional[int] = None   # torch CPU threads (None: torch's default)



def default_settings(device: str, full: bool = True) -> Settings:
    """What ``recvit bench`` (quick) and ``--full`` / ``python -m benchmarks.run`` time by default.

    GPU: Base, bf16, 224 px; quick is the paper profile at batch 1 to 256, full sweeps every scale,
    dtype, resolution and profile. CPU: Small at 224 px, fp32, where the token-wise GEMMs dominate
    and the saved FLOPs show (Tiny at 96 px is launch-bound and shows nothing): quick is batch 1 and
    16, the paper profile, about 30 s on 2 idle cores; full times every implementation and profile at
    batch 1 and 8, about 2 minutes on 2 idle cores.
    """
    if device == "cuda":
        if full:
            return Settings("cuda", ["tiny", "small", "base"], ["bf16", "fp16"], [224, 384],
                            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512], list(PROFILES), [1, 8, 64, 256])
        return Settings("cuda", ["base"], ["bf16"], [224], [1, 8, 64, 256], ["paper"], [1, 8, 64, 256],
                        implementations=list(QUICK_GPU), target_s=0.3, latency_repeats=50)
    if full:
        return Settings("cpu", ["small"], ["fp32"], [224], [1, 8], list(PROFILES), [8],
                        warmup=1, min_repeats=6, max_repeats=40, target_s=0.3, latency_repeats=6)
    return Settings("cpu", ["small"], ["fp32"], [224], [1, 16], ["paper"], [16], latency_batches=[1],
                    implementations=list(QUICK_CPU), warmup=1, min_repeats=5, max_repeats=30,
                    target_s=0.2, latency_repeats=15)


def device_info(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "triton": module_version("triton"), "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch_threads": torch.get_num_threads(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "load_average": load_average()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"sm_{props.major}{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1), driver=_nvidia_smi_driver(),
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(name=cpu_name(), driver=None)
    return info


def load_average() -> Optional[float]:
    """The machine's 1-minute load average (runnable processes, others' included); None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_warning(threads: int) -> Optional[str]:
    """A warning when other work already keeps the CPU cores busy: timings are then slow and noisy."""
    load, cores = load_average(), os.cpu_count() or 1
    if load is None or load < 0.75 * cores:
        return None
    return (f"warning: this machine is busy (load average {load:.1f} on {cores} cores): times will be "
            f"slower and noisier than on an idle machine" + (", and torch's threads wait on each other; "
                                                              "--threads 1 may steady them" if threads > 1 else ""))


def module_version(module: str) -> Optional[str]:
    """``module.__version__``, or None where ``module`` does not import."""
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _nvidia_smi_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo; else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(info: dict) -> str:
    """Folder name for a device: its name lower-cased, non-alphanumerics as '-', 'cpu-' on a CPU."""
    slug = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    return slug if info["device_type"] == "cuda" else f"cpu-{slug}"

