"""Process-group setup for torchrun or a submitit (SLURM) job (DDP): rank, world size, device; rank 0 is the only
writer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def submitit_tasks() -> int:
    """The number of tasks of the submitit job this process is one of (hydra/launcher=slurm or submitit_local
    with tasks_per_node > 1); 0 outside submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 0
    import submitit

    return submitit.JobEnvironment().num_tasks


def join_from_submitit() -> None:
    """Set torch.distributed's env:// variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) from the
    scheduler's environment, as torchrun would: every task of the job joins one process group."""
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def requeued() -> bool:
    """This process is a job the scheduler started again (SLURM requeue after a preemption or time limit, or
    submitit's own requeue): its run folder holds what the first start saved."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 or bool(os.environ.get("SUBMITIT_EXECUTOR"))


def setup(device: str, distributed: bool, backend: str | None = None) -> DistInfo:
    """Resolve the device; with `distributed`, join the torchrun process group (nccl on GPU, gloo on CPU)."""
    from gpt.errors import UserError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"hardware.device={device!r} but CUDA is not available here; use hardware=cpu")
    if not distributed:
        return DistInfo(device=device)
    if not launched_by_torchrun() and submitit_tasks() > 1:
        join_from_submitit()
    if not launched_by_torchrun():
        raise UserError("hardware=ddp needs torchrun (`torchrun --standalone --nproc_per_node=N train.py hardware=ddp`) "
                        "or a submitit launcher with tasks_per_node > 1 (hydra/launcher=slurm)")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, local_rank, world, device)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
