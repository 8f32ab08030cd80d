"""Where a stage runs: process group, device, precision. Shared by every torch stage.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) the process group starts with NCCL on CUDA
and gloo on CPU; alone, nothing is initialized and rank 0 of 1 is assumed. bf16 autocast on
CUDA GPUs of compute capability 8.0+ (A100, H100), fp32 elsewhere; NANOCHAT_DTYPE=float32 |
bfloat16 overrides it. GPUs that nvidia-smi shows but torch cannot use (a driver too old
for the wheel's CUDA) stop the stage with one line and exit 2, before any work: never a
silent run on the CPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import gpus, lifeline
from nanochat.training import run_lock

DTYPE_ENV = "NANOCHAT_DTYPE"
# Dense bf16 peak FLOP/s per GPU, for MFU; None where unknown (CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "A10": 125e12}


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # compute dtype of matmuls (autocast); weights stay fp32

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(self, flag: bool) -> bool:
        """``all_agree``: True on every rank when any rank says True."""
        return all_agree(flag, self)

    def collect(self, obj: object) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def memory_bytes(self) -> int | None:
        """The memory one process of this run may use: its GPU's total memory, or on CPU
        the machine's available memory (within a cgroup limit) shared by the processes on
        it; None when unknown."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[1]
        available = _meminfo_available()
        if available is None:
            return None
        return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    def peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo, capped by the cgroup v2 limit (containers)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    with contextlib.suppress(OSError, ValueError):
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            available = min(available, int(limit))
    return available


def compute_dtype(device: torch.device) -> torch.dtype:
    wanted = os.environ.get(DTYPE_ENV)
    if wanted:
        if wanted not in ("float32", "bfloat16"):
            raise ValueError(f"{DTYPE_ENV} must be float32 or bfloat16, got {wanted!r}")
        return getattr(torch, wanted)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


def start() -> Runtime:
    """Join the torchrun process group when there is one; pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: end with torchrun
        lifeline.die_with_launcher()
    check_cuda_usable()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device, compute_dtype(device))


def check_cuda_usable() -> None:
    """Exit 2 with one line when GPUs are visible but torch cannot use them."""
    if torch.cuda.is_available() or not gpus.visible_gpus():
        return
    if os.environ.get("RANK", "0") == "0":
        reason = gpus.unusable_reason(torch.__version__, torch.version.cuda)
        print(f"error: {reason}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def stop(runtime: Runtime) -> None:
    """The end of a run: release its checkpoint-tag locks, leave the process group."""
    run_lock.release_all()
    if runtime.distributed and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
        # Free leftover collective handles (and the tensors they hold) now, while the
        # interpreter is whole: gloo finalizing them at exit can abort the process.
        gc.collect()


def all_agree(flag: bool, runtime: Runtime) -> bool:
    """True on every rank when any rank says True (e.g. a SIGTERM seen by one of them)."""
    if not runtime.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
