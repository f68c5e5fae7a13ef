"""Hugging Face (transformers) side of exported MeSH models: config and modeling, loadable with trust_remote_code."""

from .configuration_mesh import MESH_VARIANTS, STATE_PASSING_VARIANTS, MeshGPTNeoXConfig
from .modeling_mesh import MeshGPTNeoXForCausalLM, MeshGPTNeoXModel, MeshGPTNeoXPreTrainedModel

__all__ = [
    "MESH_VARIANTS",
    "STATE_PASSING_VARIANTS",
    "MeshGPTNeoXConfig",
    "MeshGPTNeoXForCausalLM",
    "MeshGPTNeoXModel",
    "MeshGPTNeoXPreTrainedModel",
]
