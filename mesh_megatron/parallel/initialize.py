"""torch.distributed + megatron-core parallel_state setup (the only place groups are built)."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from mesh_megatron.config import ConfigError, ParallelConfig
from mesh_megatron.parallel import cpu_shims

# Offset megatron uses between the data-parallel seed and the tensor-parallel stream.
_TP_SEED_OFFSET = 2718
# Megatron's --distributed-timeout-minutes default is 10 too: how long a collective (and the
# rendezvous) may wait for a missing rank before every rank fails.
DEFAULT_TIMEOUT_MINUTES = 10


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def adopt_launcher_env(environ=os.environ) -> Optional[str]:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK from Slurm when no launcher set them, and check the
    rendezvous variables; "slurm" when Slurm's were used, else None. Raises ConfigError (one
    line) when a multi-process run cannot rendezvous. Call before anything reads WORLD_SIZE.

    `srun python pretrain_mesh.py` starts one task per rank with SLURM_PROCID (global rank),
    SLURM_LOCALID (rank on its node) and SLURM_NTASKS (world size), which torchrun and Megatron
    also read; without them every task would be rank 0 of a 1-rank run on GPU 0, all writing
    the same --save. A launcher's RANK (torchrun, deepspeed) takes precedence."""
    used = None
    if "RANK" not in environ and "SLURM_PROCID" in environ:
        try:
            rank, world = int(environ["SLURM_PROCID"]), int(environ.get("SLURM_NTASKS", "1"))
            local = int(environ.get("SLURM_LOCALID", "0"))
        except ValueError:
            raise ConfigError("SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are not integers: start the "
                              "ranks with srun (one task per rank), or with torchrun inside the job") from None
        environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        used = "slurm"
    world = int(environ.get("WORLD_SIZE", "1"))
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not environ.get(name)]
    if missing:
        how = ("export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) and "
               "MASTER_PORT=<a free port> in the batch script before srun" if used else
               "export MASTER_ADDR (the host of rank 0) and MASTER_PORT, or start through torchrun / deepspeed")
        raise ConfigError(f"WORLD_SIZE is {world}{' (SLURM_NTASKS)' if used else ''} but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set, so the ranks cannot meet: {how}")
    return used


def check_local_device(local_rank: int, device_count: int, visible: Optional[str]) -> None:
    """On a GPU node every rank drives the GPU of its local rank; one outside the visible
    devices would silently share another rank's GPU (or fail deep in CUDA)."""
    if local_rank >= device_count:
        raise ConfigError(
            f"local rank {local_rank} has no GPU: this node shows {device_count} "
            f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'}): start at most {device_count} "
            "ranks per node (srun --ntasks-per-node, torchrun --nproc_per_node), each seeing all of the "
            "node's GPUs")


def join_process_group(timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> None:
    """The default process group from the launcher's env (RANK, WORLD_SIZE, MASTER_*); a lone
    process gets an in-memory store. `timeout_minutes` bounds every collective."""
    # DeepSpeed reads LOCAL_RANK; a plain `python pretrain_mesh.py` has none: it is rank 0.
    os.environ.setdefault("LOCAL_RANK", "0")
    if dist.is_initialized():
        return
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        check_local_device(local, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        torch.cuda.set_device(local)
    timeout = timedelta(minutes=timeout_minutes)
    if "MASTER_ADDR" in os.environ or world > 1:
        dist.init_process_group(backend(), rank=rank, world_size=world, timeout=timeout)
    else:
        # A lone process (a tool, a unit test): an in-memory store, no port to pick.
        dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def initialize_distributed(parallel: ParallelConfig, timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Join the process group (join_process_group), then build megatron's TP/PP/DP groups.
    Works for torchrun, the deepspeed launcher, srun and a plain single process."""
    cpu_shims.apply()
    from megatron.core import parallel_state

    join_process_group(timeout_minutes)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
            # megatron-core's gloo twins of the DP groups serve its distributed optimizer and
            # checkpointing, neither used here (DeepSpeed does both over the main backend);
            # building them would make gloo connect every pair of nodes for nothing.
            create_gloo_process_groups=False,
        )


def set_seed(seed: int) -> None:
    """Same seed for every data-parallel rank's Python/NumPy/torch generators, plus the
    tensor-parallel RNG stream megatron forks for dropout inside TP regions."""
    from megatron.core import parallel_state, tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.reset()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tracker.add("model-parallel-rng", seed + _TP_SEED_OFFSET + 100 * tp_rank)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
