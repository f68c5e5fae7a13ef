"""The MeSH model family on megatron-core: math only, no process groups, no deepspeed."""

from mesh_megatron.model.gpt import MeshGPTModel

__all__ = ["MeshGPTModel"]
