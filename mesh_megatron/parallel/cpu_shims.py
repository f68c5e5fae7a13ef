"""The few CUDA assumptions megatron-core 0.16 makes, patched for CPU-only machines, and
one DeepSpeed start-up cost that only CPU machines pay.

`apply()` is a no-op when a GPU is present. Each patch says why it is needed; nothing else
in the project patches third-party code.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False


class CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker on the CPU generator.

    Why: the tracker forks *CUDA* RNG streams (dropout inside tensor-parallel regions,
    GPU weight init); without CUDA every call to torch.cuda.get_rng_state raises.
    Same interface: add / fork / get_states / set_states / reset / is_initialized.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """[sq, sq] bool, True above the diagonal (masked), as megatron's CUDA version."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class _TorchWithCpuDefault:
    """`torch` as seen by megatron's pipeline schedules, where the running token count is
    allocated with device="cuda": that allocation lands on CPU; everything else is torch."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def apply() -> None:
    """Install the CPU shims once, only when CUDA is unavailable."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mcore_random

    # RNG tracker: megatron's forks CUDA generator states (see CpuRNGStatesTracker).
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute (tensor_parallel.checkpoint) saves and restores the CUDA generator
    # beside the CPU one and the tracker; on CPU there is no CUDA generator to save.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    # RotaryEmbedding.get_emb moves its table to torch.cuda.current_device(): answer "cpu".
    torch.cuda.current_device = lambda: "cpu"
    # The local attention builds its causal mask with device="cuda"; build it on CPU.
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    # Pipeline schedules allocate their token counter with device="cuda".
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchWithCpuDefault()
    # Schedules and timers call torch.cuda.synchronize(); there is nothing to wait for on CPU.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # DeepSpeed's comm backend, on the CPU accelerator only, probes every op builder (compiler
    # subprocesses: ~4 s of CPU per process) and then JIT-compiles its shared-memory all-reduce
    # (deepspeed_shm_comm, a C++ build of a minute or more, again under every new HOME or
    # TORCH_EXTENSIONS_DIR: each "node" of a rehearsal) at init_distributed. The op serves
    # only inference_all_reduce (DeepSpeed inference's tensor parallelism), which training
    # never calls; every collective here goes through torch.distributed. comm/torch.py is the
    # one reader of the probe's result: answering it makes DeepSpeed skip the op, which it
    # does by itself wherever the op cannot be built.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    _APPLIED = True
