"""deepspeed.initialize, without the memory reports DeepSpeed's BF16_Optimizer forces.

At bf16 ZeRO-1 (the recipes' examples/zero1.json) DeepSpeed builds its BF16_Optimizer, whose
constructor calls `see_memory_usage(..., force=True)` 2 + 2 x (parameter groups) times: each
prints three lines of allocator and host-memory numbers and runs a full `gc.collect()` first
(about 0.5 s each in a process that has imported torch, megatron-core, DeepSpeed and
transformers: 3 s per engine on this 2-core CPU). The trainer prints its own memory line in
every log line; the reports are skipped while the engine is built and nothing else changes.
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock


@contextlib.contextmanager
def _no_forced_memory_reports():
    from deepspeed.runtime import bf16_optimizer

    with mock.patch.object(bf16_optimizer, "see_memory_usage", lambda *args, **kwargs: None):
        yield


def initialize_engine(model, optimizer, lr_scheduler, ds_config: dict[str, Any], mpu):
    """The DeepSpeed engine around `model` (deepspeed.initialize with the process groups
    already set up)."""
    import deepspeed

    with _no_forced_memory_reports():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                               config=ds_config, mpu=mpu, dist_init_required=False)
    return engine
