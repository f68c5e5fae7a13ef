"""Read a DeepSpeed JSON config and reconcile it with the command line.

The batch arithmetic must agree everywhere: train_batch_size = micro x grad-accum x
data-parallel. A value given in both places that disagrees stops the run with a message
naming both numbers; "auto" or a missing key is filled from the command line.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional

from mesh_megatron.config import ConfigError, TrainingConfig, gradient_accumulation_steps

SUPPORTED_ZERO_STAGES = (0, 1, 2)
PIPELINE_ZERO_STAGES = (0, 1)


def load_ds_config(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"--ds_config {path}: cannot read it ({e.strerror}); pass a DeepSpeed JSON file, "
                          "e.g. examples/zero2.json") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--ds_config {path}: expected a JSON object, got {type(config).__name__}")
    return config


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _given(value: Any) -> bool:
    return value is not None and value != "auto"


def resolve_batch(ds: dict[str, Any], micro: Optional[int], global_: Optional[int],
                  data_parallel_size: int, path: str) -> tuple[int, int]:
    """(micro, global) from the command line, else from the ds_config; then check agreement."""
    ds_micro, ds_global = ds.get("train_micro_batch_size_per_gpu"), ds.get("train_batch_size")
    ds_accum = ds.get("gradient_accumulation_steps")
    defaults = TrainingConfig()
    micro = micro if micro is not None else (ds_micro if _given(ds_micro) else defaults.micro_batch_size)
    if global_ is None:
        if _given(ds_global):
            global_ = ds_global
        elif _given(ds_accum):
            global_ = micro * ds_accum * data_parallel_size
        else:
            global_ = defaults.global_batch_size
    for key, ours, flag in (("train_micro_batch_size_per_gpu", micro, "--micro-batch-size"),
                            ("train_batch_size", global_, "--global-batch-size")):
        if _given(ds.get(key)) and ds[key] != ours:
            raise ConfigError(
                f"batch sizes disagree: {path} has {key}={ds[key]} but {flag} is {ours} "
                f"(global = micro x grad-accum x data-parallel = {micro} x ? x {data_parallel_size}); "
                f"make them equal or set \"{key}\": \"auto\""
            )
    if _given(ds_accum) and ds_accum * micro * data_parallel_size != global_:
        raise ConfigError(
            f"batch sizes disagree: {path} has gradient_accumulation_steps={ds_accum}, but "
            f"micro {micro} x grad-accum {ds_accum} x data-parallel {data_parallel_size} = "
            f"{micro * ds_accum * data_parallel_size} != global batch {global_}"
        )
    return int(micro), int(global_)


def finalize_ds_config(ds: dict[str, Any], train: TrainingConfig, data_parallel_size: int,
                       path: str, pipeline_stages: int = 1) -> dict[str, Any]:
    """The dict handed to deepspeed.initialize: batch, precision and clipping filled in.

    With pipeline parallelism megatron-core's schedule runs all micro-batches of a step
    (forward and backward); DeepSpeed then sees one "micro-batch" of micro x grad-accum
    samples per data-parallel rank and reduces/steps once.
    """
    stage = zero_stage(ds)
    supported = SUPPORTED_ZERO_STAGES if pipeline_stages == 1 else PIPELINE_ZERO_STAGES
    if stage not in supported:
        why = ("with megatron-core tensor-parallel layers here" if pipeline_stages == 1 else
               "with pipeline parallelism (ZeRO-2 reduces gradients in backward hooks that the "
               "pipeline schedule's own backward bypasses)")
        raise ConfigError(f"{path}: ZeRO stage {stage} is not supported {why}; "
                          f"supported stages: {', '.join(map(str, supported))}")
    if pipeline_stages > 1 and train.precision == "fp16":
        # megatron's schedule runs backward on the unscaled loss; DeepSpeed's fp16 optimizer
        # expects its loss scale applied there.
        raise ConfigError("fp16 is not supported with pipeline parallelism (the schedule's backward "
                          "skips DeepSpeed's loss scaling): use --bf16, or --pipeline-model-parallel-size 1")
    ds = copy.deepcopy(ds)
    accum = gradient_accumulation_steps(train, data_parallel_size)
    if pipeline_stages > 1:
        ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size * accum
        ds["gradient_accumulation_steps"] = 1
    else:
        ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
        ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = train.global_batch_size
    ds["gradient_clipping"] = train.clip_grad
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": train.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": train.precision == "fp16"}
    ds.setdefault("steps_per_print", 10**9)  # our own log line replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    # The optimizer and scheduler are torch objects passed to deepspeed.initialize.
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove the \"{key}\" section; set it with --lr/--min-lr/"
                              "--weight-decay flags (the optimizer is torch AdamW)")
    return ds
