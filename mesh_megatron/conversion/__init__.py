"""Hugging Face conversion: a training checkpoint (any TP/PP/ZeRO layout, read through
mesh_megatron.checkpoint) to a transformers directory and back, by an explicit key map."""
