"""The `mpu` object DeepSpeed expects, answered from megatron-core's parallel_state.

DeepSpeed still calls the older megatron names (`get_model_parallel_*`), where "model
parallel" meant tensor parallel: it uses them to count replicated parameters once in the
gradient norm. ZeRO shards optimizer state over `get_data_parallel_group()` only.
"""

from megatron.core import parallel_state as ps


class MegatronMPU:
    # Tensor parallel, under DeepSpeed's older "model parallel" names.
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
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
