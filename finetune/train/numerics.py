"""One result on every machine: pin the CPU numerical paths that choose their code by the machine they run on.

PyTorch on x86-64 picks its kernels at run time. ATen's vectorized kernels (softmax, norms, the optimizer's
element-wise math, reductions) come in DEFAULT, AVX2 and AVX-512 builds chosen by the CPU; MKL, torch's BLAS
for fp32 matmuls, chooses a code path by instruction set too, and so does oneDNN; and parallel kernels split
their sums by the number of threads. Each choice changes the order in which floats are added, so the same
training gives other bytes on a CPU with AVX-512 than on one with AVX2 (measured, issue 14: the merged
model's sha256 changed with ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine).

`pin()` fixes all of them, in this process, before torch is imported, whatever the environment says:

    ATEN_CPU_CAPABILITY=avx2          ATen's kernels: the AVX2 build on every x86-64 CPU that has AVX2
    MKL_CBWR=COMPATIBLE               MKL's conditional numerical reproducibility on its one code path that
                                      every vendor's CPU runs: MKL honours the AVX2 branch on Intel CPUs only
                                      and silently runs AUTO on AMD ones ("settings other than AUTO or
                                      COMPATIBLE are available only for Intel processors"), which made an
                                      Intel Xeon with AVX-512 train other bytes than an AMD EPYC (measured,
                                      issue 15); COMPATIBLE also fixes cache sizes, reductions and scheduling
    MKL_ENABLE_INSTRUCTIONS=AVX2      no newer MKL kernels either
    ONEDNN_MAX_CPU_ISA=AVX2           oneDNN (used for bf16 and some fp32 paths)
    OMP_NUM_THREADS, MKL_NUM_THREADS  the thread count (train.cpu_threads), also set with torch.set_num_threads

So every x86-64 machine with AVX2 (Intel since 2013, AMD since 2015) trains the same bytes; `record()` says
what torch really used, for summary.json and the manifest, MKL's branch as MKL itself reports it
(MKL_VERBOSE's "CNR:" field). A CPU without AVX2 gets ATen's DEFAULT kernels (forcing AVX2 there would stop
at the first illegal instruction): reproducible among such machines, not equal to the published hashes, and
the stage says so. On arm64 there is no MKL and ATen's
base build is NEON ("default"): runs agree with each other on the same torch build, not with x86-64.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
import tempfile

from finetune.core.machine import has_avx2

AVX2 = "avx2"
DEFAULT = "default"
MKL_BRANCH = "COMPATIBLE"  # the one MKL branch that Intel and AMD CPUs both run (see above)


def settings(threads: int, machine: str | None = None, avx2: bool | None = None) -> dict[str, str]:
    """The environment that pins the numerics of this machine (see the module docstring)."""
    machine = machine or platform.machine()
    pinned = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if machine not in ("x86_64", "AMD64"):
        return {**pinned, "ATEN_CPU_CAPABILITY": DEFAULT}
    if avx2 is None:
        avx2 = has_avx2()
    isa = "AVX2" if avx2 else None
    return {**pinned, "ATEN_CPU_CAPABILITY": AVX2 if avx2 else DEFAULT, "MKL_CBWR": MKL_BRANCH,
            "MKL_ENABLE_INSTRUCTIONS": isa or "SSE4_2", "ONEDNN_MAX_CPU_ISA": isa or "SSE41"}


def pin(threads: int) -> dict[str, str]:
    """Set `settings(threads)` in this process's environment, replacing what was there; return them.
    Must run before torch is imported: ATen, MKL and OpenMP read these once, when they start."""
    if "torch" in sys.modules:
        raise RuntimeError("finetune.train.numerics.pin() must run before torch is imported")
    pinned = settings(threads)
    os.environ.update(pinned)
    return pinned


def in_use() -> dict:
    """The numerical setup torch runs with now (after it is imported): what decides the bytes."""
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "mkl_branch": mkl_branch(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "machine": platform.machine(),
    }


@functools.cache
def mkl_branch() -> str | None:
    """The code branch MKL really runs, from MKL_VERBOSE's "CNR:" field for one small sgemm (MKL ignores a
    branch that the CPU's vendor does not support, without a word); None without MKL or without the field.
    Asked once per process: MKL fixes its branch when it starts."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    sys.stdout.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(1)  # MKL writes its verbose lines to the process's stdout
        os.dup2(captured.fileno(), 1)
        try:
            with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
                torch.ones(64, 64) @ torch.ones(64, 64)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        found = re.search(r"CNR:(\S+)", captured.read().decode(errors="replace"))
    return found.group(1) if found else None


def record(pinned: dict[str, str] | None) -> dict:
    """What torch uses now beside the pin (None: not pinned), for summary.json and the manifest. Call after
    importing torch; sets torch's thread count to the pinned one."""
    import torch

    if pinned is not None:
        torch.set_num_threads(int(pinned["OMP_NUM_THREADS"]))
    return {
        "pinned": pinned is not None,
        "environment": pinned or {},
        **in_use(),
        # x86-64 with AVX2, pinned: the bytes every such machine gives, which golden/ publishes
        "portable": pinned is not None and pinned.get("ATEN_CPU_CAPABILITY") == AVX2,
    }
