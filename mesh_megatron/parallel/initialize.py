"""torch.distributed + megatron-core parallel_state setup (the only place groups are built)."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from mesh_megatron.config import ParallelConfig
from mesh_megatron.parallel import cpu_shims

# Offset megatron uses between the data-parallel seed and the tensor-parallel stream.
_TP_SEED_OFFSET = 2718


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_distributed(parallel: ParallelConfig, timeout_minutes: int = 10) -> None:
    """Join the process group from the launcher's env (RANK, WORLD_SIZE, MASTER_*), then
    build megatron's TP/PP/DP groups. Works for torchrun, the deepspeed launcher and a
    plain single process (world size 1 on localhost)."""
    cpu_shims.apply()
    from megatron.core import parallel_state

    # DeepSpeed reads LOCAL_RANK; a plain `python pretrain_mesh.py` has none: it is rank 0.
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(minutes=timeout_minutes)
        if "MASTER_ADDR" in os.environ or world > 1:
            dist.init_process_group(backend(), rank=rank, world_size=world, timeout=timeout)
        else:
            # A lone process (a tool, a unit test): an in-memory store, no port to pick.
            dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
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
