"""The CPU this process runs on: its feature flags, read once per call from /proc/cpuinfo."""

from __future__ import annotations

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
