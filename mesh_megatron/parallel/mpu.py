"""The `mpu` object DeepSpeed expects, answered from megatron-core's parallel_state.

DeepSpeed still calls the older megatron names (`get_model_parallel_*`), where "model
parallel" meant tensor parallel: it uses them to count replicated parameters once in the
gradient norm. ZeRO shards optimizer state over `get_data_parallel_group()` only.
"""

import torch
from megatron.core import parallel_state as ps


class MegatronMPU:
    # "Model parallel" = tensor x pipeline: gradient norms are summed over this group, and
    # DeepSpeed names checkpoint files by the rank in it (mp_rank_XX = pp_rank * tp + tp_rank).
    # Replicated parameters are counted on tensor-parallel rank 0 of each stage (DeepSpeed's
    # ZeRO path asks get_tensor_model_parallel_rank; see mark_replicated_parameters).
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank():
        return torch.distributed.get_rank(group=ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size():
        return torch.distributed.get_world_size(group=ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_src_rank():
        return torch.distributed.get_process_group_ranks(ps.get_model_parallel_group())[0]

    # Current names.
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)

    @staticmethod
    def get_data_parallel_group_ranks():
        return ps.get_data_parallel_global_ranks()

    # No sequence parallelism across ranks (megatron's SP is off): trivial answers.
    @staticmethod
    def get_sequence_parallel_world_size():
        return 1

    @staticmethod
    def get_sequence_parallel_rank():
        return 0

    @staticmethod
    def get_sequence_data_parallel_world_size():
        return ps.get_data_parallel_world_size()

    @staticmethod
    def get_sequence_data_parallel_rank():
        return ps.get_data_parallel_rank()

    @staticmethod
    def get_sequence_data_parallel_group():
        return ps.get_data_parallel_group()


def mark_replicated_parameters(model: torch.nn.Module) -> None:
    """DeepSpeed's non-ZeRO gradient clipping counts a parameter when it is tagged
    model-parallel or when `get_model_parallel_rank() == 0`. Under pipeline parallelism only
    the first stage has model-parallel rank 0, so parameters that are replicated across
    tensor-parallel ranks (norms, routers, row-parallel biases) are tagged on TP rank 0 of
    every stage: each is then counted exactly once."""
    if ps.get_tensor_model_parallel_rank() != 0:
        return
    for p in model.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = True
