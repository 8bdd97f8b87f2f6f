"""The machine this process runs on: the CPU's feature flags (from /proc/cpuinfo), the NVIDIA GPUs it sees."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx2, fma, avx512f, ...) from /proc/cpuinfo; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def has_avx2() -> bool:
    """Whether this x86-64 CPU has AVX2 and FMA (what ATen's AVX2 kernels need)."""
    return {"avx2", "fma"} <= cpu_flags()


def cuda_devices() -> int:
    """How many NVIDIA GPUs this process can use, without loading torch: CUDA_VISIBLE_DEVICES when set, else
    the GPUs that `nvidia-smi -L` lists (0 without it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0
