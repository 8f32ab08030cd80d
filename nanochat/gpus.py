"""What NVIDIA hardware this machine shows, without importing torch: the GPUs nvidia-smi
lists (narrowed by CUDA_VISIBLE_DEVICES) and the driver's version.

The launcher (backends/) counts GPUs with it before any stage starts, and
``nanochat.runtime`` compares it with what torch can use, so that a stage never trains on
the CPU while GPUs sit idle because the driver is too old for the wheel's CUDA.
"""

from __future__ import annotations

import os
import shutil
import subprocess

# The oldest driver each CUDA major release runs on (NVIDIA's CUDA release notes; 12.x
# runs from 525 on through minor-version compatibility).
MIN_DRIVER = {13: "580", 12: "525"}


def _smi(*args: str) -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def visible_ids() -> list[str] | None:
    """The device ids CUDA_VISIBLE_DEVICES names, or None when it is not set (all of them).
    As CUDA reads it, an invalid entry (-1) hides itself and every entry after it."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return None
    ids = []
    for entry in (d.strip() for d in mask.split(",")):
        if not entry or entry == "-1":
            break
        ids.append(entry)
    return ids


def visible_gpus() -> int:
    """How many NVIDIA GPUs this process may use: what ``nvidia-smi -L`` lists, narrowed
    by CUDA_VISIBLE_DEVICES ("" or "-1": none). No nvidia-smi means no GPU."""
    ids = visible_ids()
    if ids == []:
        return 0
    out = _smi("-L")
    if out is None:
        return 0
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return min(count, len(ids)) if ids is not None else count


def driver_version() -> str | None:
    """The NVIDIA driver's version (``580.65.06``), or None without nvidia-smi."""
    out = _smi("--query-gpu=driver_version", "--format=csv,noheader")
    lines = [line.strip() for line in (out or "").splitlines() if line.strip()]
    return lines[0] if lines else None


def unusable_reason(torch_version: str, torch_cuda: str | None) -> str:
    """One line for GPUs that are visible while torch cannot use them, naming the driver and
    the CUDA the wheel needs, and how to choose the CPU on purpose."""
    count = visible_gpus()
    driver = driver_version() or "unknown"
    if torch_cuda is None:
        why = f"this torch {torch_version} is a CPU-only build"
        fix = "install the CUDA build of torch"
    else:
        need = MIN_DRIVER.get(int(torch_cuda.split(".")[0]))
        why = f"this torch {torch_version} is built for CUDA {torch_cuda}"
        why += f", which needs NVIDIA driver >= {need}" if need else ""
        fix = "update the NVIDIA driver (or use a torch built for an older CUDA)"
    return (
        f"{count} NVIDIA GPU(s) are visible (nvidia-smi, driver {driver}) but CUDA is not "
        f"usable: {why}. Fix: {fix}; to train on the CPU on purpose, set "
        "CUDA_VISIBLE_DEVICES=''"
    )
