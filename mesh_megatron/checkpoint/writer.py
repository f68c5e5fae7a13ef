"""Write a weights-only training checkpoint that `pretrain_mesh.py --load` starts from.

Same layout as CheckpointManager.save, at iteration 0 and without optimizer files:

    SAVE/latest                                  "iter_0000000"
    SAVE/model.yaml                              every ModelConfig field: pass it as --config
    SAVE/iter_0000000/mp_rank_{tp:02d}_model_states.pt   {"module": weights, ...} per TP rank
    SAVE/iter_0000000/tokenizer/<file>           the tokenizer, when there is one
    SAVE/iter_0000000/manifest.json              every file's size and SHA-256 (verified at load)
    SAVE/iter_0000000/mesh_config.json           {"model", "iteration": 0, "parallel",
                                                  "tokenizer", "weights_only": true, "source"}

`weights_only: true` makes CheckpointManager.load read the module weights only (fresh
optimizer and LR schedule, iteration 0). The module dict carries megatron's `_extra_state`
entries, so DeepSpeed's strict load accepts it as if a run had saved it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import torch
import yaml
from torch import Tensor

from mesh_megatron.checkpoint.manager import CONFIG_FILE, LATEST, _write_atomic, tag_for
from mesh_megatron.checkpoint.manifest import MANIFEST, build_manifest
from mesh_megatron.checkpoint.reader import shard_name
from mesh_megatron.checkpoint.skeleton import check_weights, meta_model, module_state
from mesh_megatron.checkpoint.tensor_parallel import shard_state_dict
from mesh_megatron.config import ConfigError, ModelConfig, ParallelConfig
from mesh_megatron.parallel.pipeline_layout import build_layout

MODEL_YAML = "model.yaml"
WEIGHTS_ONLY = "weights_only"


def write_training_checkpoint(save_dir: str, config: ModelConfig, state: dict[str, Tensor], *,
                              tensor_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              pipeline_split: Optional[list[int]] = None,
                              tokenizer: Optional[tuple[str, str]] = None,
                              source: Optional[dict[str, Any]] = None, manifest: bool = True) -> str:
    """Write `state` (full TP=1 weights, training names) as iteration 0 of `save_dir`, split
    for TP x PP: stage p, TP rank t goes to mp_rank_{p * TP + t} (DeepSpeed's naming with
    this project's mpu), holding that stage's names only.

    `config.padded_vocab_size(tensor_parallel_size)` must equal the embedding rows, so the run
    that loads it builds the same shapes. `tokenizer` is (type, file). `manifest`: record every
    file's size and SHA-256 (as a training save does); pass False when the weights come from a
    checkpoint that could not be verified, so an unchecked input is never certified. Returns the tag.
    """
    rows = state["embedding.word_embeddings.weight"].shape[0]
    if config.padded_vocab_size(tensor_parallel_size) != rows:
        raise ConfigError(f"vocab_size {config.vocab_size} pads to {config.padded_vocab_size(tensor_parallel_size)} "
                          f"rows at TP={tensor_parallel_size}, the weights have {rows}")
    skeleton_config = dataclasses.replace(config, make_vocab_size_divisible_by=rows)
    skeleton = meta_model(skeleton_config)
    check_weights(state, skeleton, "imported weights")

    tag = tag_for(0)
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    tp, pp = tensor_parallel_size, pipeline_model_parallel_size
    stages = [None] if pp == 1 else build_layout(skeleton_config, pp, pipeline_split).stages
    for pp_rank, stage in enumerate(stages):
        stage_skeleton = skeleton if stage is None else meta_model(skeleton_config, stage)
        stage_state = {k: v for k, v in state.items() if k in stage_skeleton.state_dict()}
        for tp_rank in range(tp):
            shard = shard_state_dict(stage_state, stage_skeleton, tp_rank, tp)
            torch.save({"module": module_state(shard, stage_skeleton), "dp_world_size": 1,
                        "mp_world_size": tp * pp, "global_steps": 0, "skipped_steps": 0,
                        "iteration": 0, WEIGHTS_ONLY: True},
                       os.path.join(tag_dir, shard_name(pp_rank * tp + tp_rank)))

    tok_meta = None
    if tokenizer is not None:
        kind, path = tokenizer
        os.makedirs(os.path.join(tag_dir, "tokenizer"), exist_ok=True)
        name = os.path.basename(path)
        shutil.copyfile(path, os.path.join(tag_dir, "tokenizer", name))
        tok_meta = {"type": kind, "file": f"tokenizer/{name}"}
    model_dict = dataclasses.asdict(config)
    meta = {"model": model_dict, "iteration": 0,
            "parallel": dataclasses.asdict(ParallelConfig(tp, pp, pipeline_split)),
            "tokenizer": tok_meta, WEIGHTS_ONLY: True, "source": source or {}}
    if manifest:  # before mesh_config.json, the commit record, as CheckpointManager saves
        _write_atomic(os.path.join(tag_dir, MANIFEST),
                      json.dumps(build_manifest(tag_dir, None, 0, skip={CONFIG_FILE}), indent=1))
    _write_atomic(os.path.join(tag_dir, CONFIG_FILE), json.dumps(meta, indent=1))
    yaml_dict = {**model_dict, "learned_scalar_init": list(config.learned_scalar_init)}
    _write_atomic(os.path.join(save_dir, MODEL_YAML),
                  "# ModelConfig of this imported checkpoint: pretrain_mesh.py --config this --load its dir\n"
                  + yaml.safe_dump(yaml_dict, sort_keys=False))
    _write_atomic(os.path.join(save_dir, LATEST), tag)
    return tag
