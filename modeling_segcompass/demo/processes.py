"""The demo on several CPU processes: data-parallel training with torch.distributed (gloo).

`default_processes` picks 2 processes when this process may run on 2 or more cores, else 1.
`launch` starts the ranks (`torch.multiprocessing`, spawn) with the environment
`accelerate launch` would set (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, ACCELERATE_USE_CPU) and one thread each; every rank runs the demo's
stages, the training stages data-parallel (the transformers / TRL trainers through accelerate,
VLM pretraining with its own all-reduce), and rank 0 alone evaluates and writes the outputs.

`replicas_identical` checks the invariant data parallelism rests on: after a stage every
rank holds the same parameters.
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
from collections.abc import Callable
from typing import Any

import torch

#: Processes the demo uses at most (the machine the embedded default targets has 2 cores; a
#: larger machine would gain little from more ranks of a model this small).
MAX_PROCESSES = 2


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_processes() -> int:
    """2 processes when 2 or more cores are available, else 1."""
    return max(1, min(MAX_PROCESSES, available_cores()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_memory_mb() -> float:
    """This process's peak resident memory (ru_maxrss) in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _rank_entry(
    rank: int, world: int, port: int, target: Callable[..., Any], kwargs: dict[str, Any]
) -> None:
    """What each spawned rank runs: the distributed environment, one thread, then `target`."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    torch.set_num_threads(1)
    from accelerate import PartialState

    PartialState(cpu=True)  # gloo; the trainers' TrainingArguments(use_cpu=True) share it
    try:
        target(rank=rank, world_size=world, **kwargs)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch(processes: int, target: Callable[..., Any], **kwargs: Any) -> None:
    """Run ``target(rank=r, world_size=processes, **kwargs)`` on ``processes`` spawned CPU
    ranks joined by a gloo process group; returns when every rank has, and raises when one
    fails (the others are then stopped). ``target`` must be importable (a module-level
    function) and ``kwargs`` picklable."""
    import torch.multiprocessing as mp

    if processes < 2:
        raise ValueError(f"launch: needs 2 or more processes, got {processes}.")
    mp.start_processes(
        _rank_entry,
        args=(processes, _free_port(), target, kwargs),
        nprocs=processes,
        join=True,
        start_method="spawn",
    )


def _checksum(model: torch.nn.Module) -> torch.Tensor:
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return torch.tensor(list(digest.digest()[:8]), dtype=torch.int64)


def replicas_identical(model: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters (True without torch.distributed).
    A collective: every rank must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    mine = _checksum(model)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(mine, other) for other in gathered)


def barrier() -> None:
    """Wait for every rank (nothing without torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = [
    "MAX_PROCESSES",
    "available_cores",
    "barrier",
    "default_processes",
    "launch",
    "peak_memory_mb",
    "replicas_identical",
]
