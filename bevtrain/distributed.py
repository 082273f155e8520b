"""Process group, device choice and small collectives.

One process (``python train_nuscenes.py``): no process group; the device is ``--device``
(``auto`` = ``cuda:<device_ids[0]>`` when CUDA is available, else CPU).

``torchrun --nproc_per_node=N train_nuscenes.py ...`` (one or many machines): torchrun sets
RANK / LOCAL_RANK / WORLD_SIZE; we join a process group (NCCL on GPUs, gloo on CPU), each rank
uses ``cuda:LOCAL_RANK`` (or the CPU), rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Sequence

import torch
import torch.distributed as dist

from bevtrain.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _single_device(device: str, device_ids: Sequence[int]) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            gpu = int(device_ids[0]) if device_ids else 0
            if gpu >= torch.cuda.device_count():
                raise ConfigError(
                    f"flag 'device_ids' asks for GPU {gpu} but only {torch.cuda.device_count()} visible"
                )
            return torch.device("cuda", gpu)
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"flag 'device' is {device!r} but CUDA is not available here; use --device=cpu")
    return torch.device(device)


def init_distributed(device: str = "auto", device_ids: Sequence[int] = (0,)) -> DistInfo:
    """Join the torchrun process group if there is one; choose this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 0, 1, _single_device(device, device_ids))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"flag 'device' is {device!r} but CUDA is not available here; use --device=cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=30),
        )
    return DistInfo(rank, local_rank, world_size, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place reduction across ranks (no-op in one process), for tensors on any device: NCCL
    reduces CUDA tensors only and gloo CPU ones, so the tensor travels to the backend's device."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    want_cuda = dist.get_backend() == "nccl"
    if t.is_cuda == want_cuda:
        dist.all_reduce(t, op=op)
    else:
        moved = t.to(torch.device("cuda", torch.cuda.current_device()) if want_cuda else "cpu")
        dist.all_reduce(moved, op=op)
        t.copy_(moved)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (no-op in one process)."""
    return all_reduce_(t, dist.ReduceOp.SUM)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``batch_size`` is the global batch per micro-step; each rank loads its share."""
    if batch_size % world_size:
        raise ConfigError(
            f"flag 'batch_size'={batch_size} is the global batch per micro-step and must divide by "
            f"the number of processes ({world_size}); use a multiple of {world_size}"
        )
    return batch_size // world_size
