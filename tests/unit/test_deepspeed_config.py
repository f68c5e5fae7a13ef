"""What parallel/deepspeed_config.py hands DeepSpeed: gradient precision, timers, overlap, refusals."""

import pytest

from mesh_megatron.config import ConfigError, TrainingConfig
from mesh_megatron.parallel.deepspeed_config import (check_recompute, describe_gradient_precision, finalize_ds_config,
                                                     gradient_dtypes, gradient_precision_warning)

BF16 = TrainingConfig(micro_batch_size=1, global_batch_size=32, precision="bf16")
FP32 = TrainingConfig(micro_batch_size=1, global_batch_size=32)


def final(ds, train=BF16, pp=1):
    return finalize_ds_config(ds, train, 1, "x.json", pp)


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_accumulates_and_reduces_in_fp32_at_zero1_and_zero2(stage):
    ds = final({"zero_optimization": {"stage": stage}})
    assert gradient_dtypes(ds) == ("fp32", "fp32")
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    # ZeRO-1: BF16_Optimizer must move gradients in its hooks (the pipeline's backward skips the epilogue).
    assert ds["bf16"].get("immediate_grad_update") is (True if stage == 1 else None)
    assert describe_gradient_precision(ds, "bf16").startswith("gradients accumulated in fp32, reduced in fp32")
    assert gradient_precision_warning(ds, "bf16", "x.json") is None


def test_zero0_bf16_warns_and_refuses_fp32_accumulation():
    ds = final({"zero_optimization": {"stage": 0}})
    assert gradient_dtypes(ds) == ("bf16", "bf16")
    warning = gradient_precision_warning(ds, "bf16", "x.json")
    assert warning.startswith("warning: x.json is ZeRO stage 0") and "examples/zero1.json" in warning
    with pytest.raises(ConfigError, match="cannot accumulate bf16 gradients in fp32 at ZeRO stage 0.*zero1.json"):
        final({"zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "fp32"}})


def test_a_ds_config_that_chooses_keeps_its_choice():
    ds = final({"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bfloat16"},
                "timers": {"throughput": {"enabled": True}}})
    assert gradient_dtypes(ds) == ("bf16", "bf16") and "communication_data_type" not in ds
    assert "grad_accum_dtype to bf16" in gradient_precision_warning(ds, "bf16", "x.json")
    assert ds["timers"]["throughput"]["enabled"] is True
    with pytest.raises(ConfigError, match="grad_accum_dtype 'fp8' is not a dtype"):
        final({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp8"}})


def test_fp32_untouched_timer_off_and_no_overlap_under_pipeline():
    ds = final({"zero_optimization": {"stage": 1, "overlap_comm": True}}, train=FP32)
    assert "data_types" not in ds and gradient_dtypes(ds) == ("fp32", "fp32")
    assert ds["timers"]["throughput"]["enabled"] is False  # DeepSpeed's default: on, synchronized
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert final({"zero_optimization": {"stage": 1, "overlap_comm": True}}, pp=2)["zero_optimization"][
        "overlap_comm"] is False
    with pytest.raises(ConfigError, match="immediate_grad_update false loses the gradients under pipeline"):
        final({"zero_optimization": {"stage": 1}, "bf16": {"immediate_grad_update": False}}, pp=2)


def test_recompute_of_a_looped_core_refused_where_deepspeed_reduces_in_hooks():
    zero2, zero1_overlap = final({"zero_optimization": {"stage": 2}}, FP32), \
        final({"zero_optimization": {"stage": 1, "overlap_comm": True}}, FP32)
    for ds in (zero2, zero1_overlap):
        with pytest.raises(ConfigError, match="cannot recompute a looped core.*examples/zero1.json"):
            check_recompute(ds, "loop", True, "x.json")
        check_recompute(ds, "none", True, "x.json")
        check_recompute(ds, "layer", False, "x.json")  # vanilla: each weight used once
    check_recompute(final({"zero_optimization": {"stage": 1}}, FP32), "loop", True, "x.json")
    # bf16 at ZeRO-1 is DeepSpeed's BF16_Optimizer: its hooks only add into the fp32 buffer.
    check_recompute(final({"zero_optimization": {"stage": 1, "overlap_comm": True}}), "loop", True, "x.json")
