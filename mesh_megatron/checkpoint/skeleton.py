"""A weightless MeshGPTModel (meta device): the names, shapes and TP split dims of a config.

Readers and writers of checkpoints ask the model itself what it holds instead of keeping a
table: its weight names and shapes, its `_extra_state` entries (a strict `load_state_dict`,
as DeepSpeed does, wants them back), and `partition_dims` for the TP merge.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from mesh_megatron.config import ConfigError, ExecutionConfig, ModelConfig, ParallelConfig, to_transformer_config, validate


# Entries of a state dict that carry no weight: megatron's TE/local extra state, rotary tables,
# and the causal-mask buffers old GPT-NeoX checkpoints stored.
_IGNORED_SUFFIXES = ("._extra_state", "_extra_state", "inv_freq", "attention.bias", "attention.masked_bias")


def is_ignored(name: str) -> bool:
    """True for state-dict entries that are not weights (extra state, rotary tables, masks)."""
    return name.endswith(_IGNORED_SUFFIXES)


def with_padded_vocab_of(config: ModelConfig, tensor_parallel_size: int) -> ModelConfig:
    """The config whose TP=1 model has the embedding rows a TP=`tensor_parallel_size` run
    had (megatron pads the vocabulary to a multiple of divisible_by * TP)."""
    if tensor_parallel_size == 1:
        return config
    return dataclasses.replace(
        config, make_vocab_size_divisible_by=config.make_vocab_size_divisible_by * tensor_parallel_size)


def _build(config: ModelConfig, device: str, initialize: bool, stage=None) -> nn.Module:

    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.parallel.initialize import initialize_distributed

    validate(config)
    initialize_distributed(ParallelConfig())  # no-op when this process already has groups
    with torch.device(device):
        # megatron's local layers with torch sdpa on every host: their parameter names are
        # Transformer Engine's (layer_spec.py keeps norms separate), and conversion needs no
        # GPU kernels. A fixed
        # init_seed: no random draw, which the meta device cannot .item(); the values are
        # overwritten by the checkpoint's anyway.
        return MeshGPTModel(config, to_transformer_config(config, perform_initialization=initialize),
                            execution=ExecutionConfig(attention_backend="sdpa"), init_seed=0, stage=stage)


def meta_model(config: ModelConfig, stage=None) -> nn.Module:
    """MeshGPTModel at TP=1 on the meta device (no memory, no init cost); with `stage`
    (a pipeline_layout.Stage) only that pipeline stage's pieces.

    Initialisation is left on: megatron tags split weights with `partition_dim` only while
    initialising them, and on the meta device that costs nothing.
    """
    return _build(config, "meta", initialize=True, stage=stage)


def weight_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Every weight the model holds (parameters and persistent buffers), by name."""
    return {name: t.shape for name, t in model.state_dict().items()
            if isinstance(t, Tensor) and not is_ignored(name)}


def check_weights(state: dict[str, Tensor], model: nn.Module, source: str) -> None:
    """Raise one clear error when `state` is not exactly this model's weights."""
    shapes = weight_shapes(model)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ConfigError(f"{source}: {'; '.join(parts)}: the weights do not match the model config "
                          "stored with them (layout/variant/width)")
    for name, shape in shapes.items():
        if state[name].shape != shape:
            raise ConfigError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model config "
                              f"gives {tuple(shape)}")


def module_state(state: dict[str, Tensor], model: nn.Module) -> dict[str, object]:
    """`state` in the model's own key order, with its `_extra_state` entries added back, as
    `model.state_dict()` would give it: what DeepSpeed's strict module load expects."""
    full = model.state_dict()
    return {name: state[name] if name in state else value for name, value in full.items()}


def build_model(config: ModelConfig, state: dict[str, Tensor]) -> nn.Module:
    """A CPU MeshGPTModel at TP=1 holding `state` (full training names), in eval mode."""
    from megatron.core import tensor_parallel

    model = _build(config, "cpu", initialize=False)
    # megatron's forward forks this RNG stream (dropout inside TP regions); a training run adds
    # it in set_seed, a lone tool process has not, and must not reseed the global generators.
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if "model-parallel-rng" not in tracker.get_states():
        tracker.add("model-parallel-rng", 0)
    check_weights(state, model, "weights")
    model.load_state_dict(module_state(state, model), strict=True)
    return model.eval()
