"""The process group: which device a rank trains on, which backend serves which device, and the few
collectives the trainer itself makes (always on the training device).

NCCL serves CUDA tensors only. A group created as plain "nccl" fails on the first collective of a CPU
tensor ("No backend type associated with device type cpu"), so on GPUs the default group maps both
devices ("cpu:gloo,cuda:nccl") AND the trainer's own reductions use tensors on the training device: either
alone would hide the other's mistakes from a CPU test.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist

from cafe_core.config import ConfigError
from cafe_core.ports import free_port

BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


def training_device(local_rank: int) -> torch.device:
    """cuda:<local rank modulo the visible GPUs> (several ranks may share one GPU), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_map(backend: str) -> dict[str, str]:
    """{device type: backend} of a torch.distributed backend string ("gloo", "cpu:gloo,cuda:nccl")."""
    from torch.distributed.distributed_c10d import BackendConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unknown name is refused below, not warned about
        mapping = BackendConfig(backend).get_device_backend_map()
    unknown = sorted({b for b in mapping.values() if b not in BACKENDS})
    if unknown:
        raise ConfigError(f"train.dist_backend={backend!r}: unknown backend {', '.join(unknown)}; "
                          f"use one of {', '.join(BACKENDS)}, optionally per device as in 'cpu:gloo,cuda:nccl'")
    return mapping


def process_group_backend(device: torch.device, configured: str | None = None) -> str:
    """The backend string for a rank training on `device`: the configured one (checked to serve that
    device), else gloo on CPU and 'cpu:gloo,cuda:nccl' on GPUs (NCCL for the model's collectives, gloo for
    any CPU tensor a library reduces)."""
    backend = configured or ("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if device.type not in backend_map(backend):
        raise ConfigError(f"train.dist_backend={backend!r} serves no {device.type} tensors and this rank trains on "
                          f"{device}; map the device, e.g. '{device.type}:gloo', or leave train.dist_backend unset")
    return backend


def init_process_group(device: torch.device, backend: str) -> tuple[int, int]:
    """Create the default group from torchrun's environment (a world of one on loopback without it);
    returns (rank, world size). The group is bound to the rank's GPU, which may be shared by ranks."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU (DeepSpeed would bind cuda:LOCAL_RANK,
        # which does not exist when ranks share a GPU); a world of one has no peer to bind for.
        bind = device if device.type == "cuda" and int(os.environ["WORLD_SIZE"]) > 1 else None
        dist.init_process_group(backend, device_id=bind)
    return dist.get_rank(), dist.get_world_size()


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a few numbers, reduced as a float64 tensor on the training device."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return dict(zip(values, (v / world for v in sum_over_ranks(list(values.values()), device))))
