"""``mrl train`` under ``torchrun`` or ``accelerate launch``: who this process is and what it may do.

Both launchers describe the job in environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``). From them each process learns its place; the process group (NCCL on GPUs,
gloo on CPUs) is started once, at the top of training, with a timeout long enough for rank 0's
evaluations, so that every rank is bound to the job before any work and a wrong launch fails at
once. Rank 0 alone evaluates, writes reports, publishes the model folder and logs; the other ranks
train, then wait at a barrier until rank 0 has published, and exit 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from core.errors import ConfigError

logger = logging.getLogger(__name__)

# Rank 0 evaluates before training and publishes after it while the others wait in a collective:
# the group's timeout must outlast a full-corpus evaluation, not torch's default 30 minutes.
GROUP_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"launcher variable {name}={raw!r} is not an integer") from None


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """This process's place in the job, from the launcher's variables (none: a single process).

    Raises:
        ConfigError: For variables that contradict each other: a rank outside the world, a rank without
            a world size (or the reverse), a local rank outside the node's processes.
    """
    env = os.environ if environ is None else environ
    rank, world, local, local_world = (
        _int(env, name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    )
    if rank is None and world is None:
        if local not in (None, -1, 0):
            raise ConfigError(f"mismatched ranks: LOCAL_RANK={local} but no RANK and WORLD_SIZE (launch with torchrun)")
        return Launch()
    if rank is None or world is None:
        raise ConfigError(f"mismatched ranks: RANK={rank} and WORLD_SIZE={world} must be set together")
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"mismatched ranks: RANK={rank} is not in 0..{world - 1} (WORLD_SIZE={world})")
    local = rank if local is None else local
    local_world = world if local_world is None else local_world
    if not 0 <= local < local_world <= world:
        raise ConfigError(
            f"mismatched ranks: LOCAL_RANK={local} with LOCAL_WORLD_SIZE={local_world} and WORLD_SIZE={world}"
        )
    return Launch(rank, world, local, local_world)


def per_device_batch(batch_size: int, launch: Launch) -> int:
    """``--batch-size`` is the global batch (the number of in-batch negatives); each rank takes its share.

    Raises:
        ConfigError: If the processes cannot share it evenly.
    """
    if batch_size % launch.world_size:
        raise ConfigError(
            f"--batch-size {batch_size} is not divisible by the {launch.world_size} processes of this launch; "
            f"use a multiple of {launch.world_size}"
        )
    return batch_size // launch.world_size


def check_launch_options(launch: Launch, gradual_unfreeze: bool) -> None:
    """Raises: ConfigError for options that cannot run in several processes."""
    if launch.distributed and gradual_unfreeze:
        raise ConfigError(
            "--gradual-unfreeze changes which weights train during a run, which DistributedDataParallel cannot "
            "follow; run it in one process"
        )


def start(launch: Launch) -> str | None:
    """Start the process group (once) and pin this rank's GPU; returns the backend, or None for one process.

    Raises:
        ConfigError: More processes on this machine than it has GPUs.
    """
    if not launch.distributed:
        return None
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if launch.local_world_size > torch.cuda.device_count():
            raise ConfigError(
                f"{launch.local_world_size} processes on this machine but {torch.cuda.device_count()} GPUs: "
                "--nproc_per_node must not exceed the GPUs"
            )
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=GROUP_TIMEOUT)
    logger.info("rank %d of %d (%s)", launch.rank, launch.world_size, backend)
    return backend


def barrier(launch: Launch) -> None:
    if launch.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
