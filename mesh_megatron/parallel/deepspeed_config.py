"""Read a DeepSpeed JSON config and reconcile it with the command line.

The batch arithmetic must agree everywhere: train_batch_size = micro x grad-accum x
data-parallel. A value given in both places that disagrees stops the run with a message
naming both numbers; "auto" or a missing key is filled from the command line.

Gradient precision under bf16 is chosen here too, through DeepSpeed's own switches
(`data_types.grad_accum_dtype`, `communication_data_type`): DeepSpeed's default is the
model dtype, so a step of N micro-batches would sum N bf16 gradients in bf16 (8 mantissa
bits: each add rounds at 2^-9 relative). With ZeRO-1/2 the default becomes fp32
accumulation and fp32 reduction, as Megatron and gpt-neox do; ZeRO-0 cannot (DeepSpeed
refuses fp32 accumulation there), so bf16 at ZeRO-0 gets a warning naming ZeRO-1.
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


# DeepSpeed's dtype spellings (runtime/config.py DtypeEnum) -> ours.
_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
                "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
                "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16"}


def _dtype_name(value: Any, key: str, path: str) -> str:
    if str(value) not in _DTYPE_NAMES:
        raise ConfigError(f"{path}: {key} {value!r} is not a dtype DeepSpeed knows: use \"fp32\", \"bf16\" or \"fp16\"")
    return _DTYPE_NAMES[str(value)]


def gradient_dtypes(ds: dict[str, Any]) -> tuple[str, str]:
    """(accumulation, reduction) dtype of a finalized ds_config, by DeepSpeed's rules: each is
    the model dtype unless `data_types.grad_accum_dtype` / `communication_data_type` says
    otherwise (engine.get_data_types, engine.communication_data_type)."""
    model = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    comm = ds.get("communication_data_type")
    return (_DTYPE_NAMES[str(accum)] if accum is not None else model,
            _DTYPE_NAMES[str(comm)] if comm is not None else model)


def describe_gradient_precision(ds: dict[str, Any], precision: str) -> str:
    """One phrase for the start-of-run log and --print-config, e.g.
    "gradients accumulated in fp32, reduced in fp32"."""
    accum, comm = gradient_dtypes(ds)
    text = f"gradients accumulated in {accum}, reduced in {comm}"
    return text + (" (fp32 master weights and Adam states)" if precision in ("bf16", "fp16") else "")


def gradient_precision_warning(ds: dict[str, Any], precision: str, path: str) -> Optional[str]:
    """The one line a bf16 run gets when its gradients are summed in bf16, with the fix."""
    if precision != "bf16" or gradient_dtypes(ds)[0] != "bf16":
        return None
    if zero_stage(ds) == 0:
        return (f"warning: {path} is ZeRO stage 0, where DeepSpeed accumulates bf16 gradients in bf16 "
                "(it refuses fp32 accumulation there): use --ds_config examples/zero1.json, which computes "
                "the same update with fp32 accumulation (ZeRO only partitions the optimizer state)")
    return (f"warning: {path} sets data_types.grad_accum_dtype to bf16: gradients are summed in bf16 "
            "across micro-batches; remove the key for fp32 accumulation")


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
                       path: str, pipeline_stages: int = 1, recomputed_shared_core: bool = False) -> dict[str, Any]:
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
    if train.precision == "bf16":
        _bf16_gradients_in_fp32(ds, stage, path, pipeline_stages)
    if pipeline_stages > 1 and ds.get("zero_optimization", {}).get("overlap_comm"):
        # The pipeline schedule runs backward outside DeepSpeed, which reduces once afterwards
        # (allreduce_gradients): nothing to overlap with. DeepSpeed's own pipeline engine turns
        # it off too; its hooks would otherwise reduce inside every micro-batch's backward.
        ds["zero_optimization"]["overlap_comm"] = False
    if recomputed_shared_core and ds.get("zero_optimization", {}).get("overlap_comm"):
        # Under --recompute each iteration of a looped core reruns its backward on its own
        # (megatron's reentrant checkpoint), so a shared weight's gradient is ready K times per
        # backward; the overlapped reduction hooks reduce it at the first and refuse the rest
        # ("Gradient computed twice"). Reduce once after backward instead.
        ds["zero_optimization"]["overlap_comm"] = False
    # DeepSpeed's throughput timer (on by default) calls cuda.synchronize() at every forward
    # and every engine.step(): the trainer measures throughput itself, once per log window.
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    ds.setdefault("steps_per_print", 10**9)  # our own log line replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    # The optimizer and scheduler are torch objects passed to deepspeed.initialize.
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove the \"{key}\" section; set it with --lr/--min-lr/"
                              "--weight-decay flags (the optimizer is torch AdamW)")
    return ds


def _bf16_gradients_in_fp32(ds: dict[str, Any], stage: int, path: str, pipeline_stages: int) -> None:
    """fp32 gradient accumulation and reduction for bf16 at ZeRO-1/2, unless the ds_config
    chose otherwise. DeepSpeed then runs, at ZeRO-1, its BF16_Optimizer (fp32 gradient
    buffer, fp32 master partition; engine._do_optimizer_sanity_check) and, at ZeRO-2, its ZeRO
    optimizer accumulating the reduce-scattered partition in fp32."""
    given = ds.get("data_types", {}).get("grad_accum_dtype")
    accum = _dtype_name(given, "data_types.grad_accum_dtype", path) if given is not None else None
    if ds.get("communication_data_type") is not None:
        _dtype_name(ds["communication_data_type"], "communication_data_type", path)
    if stage == 0:
        if accum == "fp32":
            raise ConfigError(f"{path}: DeepSpeed cannot accumulate bf16 gradients in fp32 at ZeRO stage 0: use "
                              "--ds_config examples/zero1.json (ZeRO-1 computes the same update) or remove "
                              "data_types.grad_accum_dtype")
        return
    if accum is None:
        ds["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": "fp32"}
        accum = "fp32"
    if accum == "fp32":
        # The data-parallel sum too (DeepSpeed's default communication dtype is bf16).
        ds.setdefault("communication_data_type", "fp32")
    if stage == 1 and accum == "fp32":
        # BF16_Optimizer moves each parameter's bf16 gradient into its fp32 buffer either in
        # engine.backward's epilogue or, with immediate_grad_update, in a hook the moment autograd
        # has it (and frees the bf16 copy). The pipeline schedule's backward bypasses the
        # epilogue, so only the hook sees its gradients; one rule for both paths.
        bf16 = ds["bf16"]
        if bf16.get("immediate_grad_update") is False and pipeline_stages > 1:
            raise ConfigError(f"{path}: bf16.immediate_grad_update false loses the gradients under pipeline "
                              "parallelism (the schedule's backward skips DeepSpeed's epilogue): remove the key")
        bf16.setdefault("immediate_grad_update", True)


def check_recompute(ds: dict[str, Any], recompute: str, core_repeats: bool, path: str) -> None:
    """Refuse what DeepSpeed's per-parameter reduction hooks cannot take: recomputing a core
    whose weights run more than once per forward. Recomputation replays each iteration in its
    own backward, so a shared weight's gradient arrives once per iteration, and DeepSpeed's
    ZeRO optimizer (at stage 2, or at stage 1 with overlap_comm) reduces a weight at its first
    arrival and stops at the second ("has already been reduced"). ZeRO-1 without overlap, or
    bf16 ZeRO-1 (BF16_Optimizer, which only adds into its fp32 buffer), is fine."""
    if recompute == "none" or not core_repeats:
        return
    stage = zero_stage(ds)
    bf16_optimizer = ds.get("bf16", {}).get("enabled") and gradient_dtypes(ds)[0] == "fp32"
    overlapped = ds.get("zero_optimization", {}).get("overlap_comm") and not bf16_optimizer
    if stage == 2 or (stage == 1 and overlapped):
        what = "ZeRO stage 2" if stage == 2 else "ZeRO-1 with overlap_comm"
        raise ConfigError(f"{path}: {what} cannot recompute a looped core (--recompute {recompute}): its "
                          "hooks reduce each weight once per backward, and recomputation delivers the shared "
                          "core's gradient once per iteration; use --ds_config examples/zero1.json or "
                          "--recompute none")
