"""Read a training checkpoint (written by CheckpointManager) into one full TP=1 state dict.

    CKPT/latest                                  the tag of the newest complete checkpoint
    CKPT/iter_0000010/mesh_config.json           {"model", "iteration", "parallel", "tokenizer"}
    CKPT/iter_0000010/mp_rank_{mp:02d}_model_states.pt   DeepSpeed: ["module"] = that rank's weights
    CKPT/iter_0000010/tokenizer/<file>           the run's tokenizer

mp = pp_rank * tp_size + tp_rank. Module names are global (a pipeline stage holds a subset
of the full model's names), so stages merge by dict union; tensor-parallel shards are then
concatenated along the dim megatron split them (`partition_dims` of a TP=1 model). ZeRO-1/2
keep full module weights in the mp_rank files, so optimizer shards are never read.

Every failure is one ConfigError line naming the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from mesh_megatron.checkpoint.manager import CONFIG_FILE, read_latest, tag_for
from mesh_megatron.checkpoint.skeleton import check_weights, is_ignored, meta_model, with_padded_vocab_of
from mesh_megatron.checkpoint.tensor_parallel import partition_dims
from mesh_megatron.config import ConfigError, ModelConfig, ParallelConfig

_TAG_RE = re.compile(r"^iter_(\d{7})$")


def error_summary(error: BaseException) -> str:
    """`Type: first line` of an exception, for one-line error messages."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def shard_name(mp_rank: int) -> str:
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


@dataclass
class TrainingCheckpoint:
    """One tag of a checkpoint directory, with what its mesh_config.json says."""

    load_dir: str
    tag: str
    iteration: int
    model: ModelConfig
    parallel: ParallelConfig
    tokenizer_type: Optional[str]  # "sentencepiece" | "hf" | None
    tokenizer_file: Optional[str]  # absolute path, or None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return os.path.join(self.load_dir, self.tag)

    @property
    def tp(self) -> int:
        return self.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.parallel.pipeline_model_parallel_size


def available_iterations(load_dir: str) -> list[int]:
    """Iterations with a complete tag directory (one holding mesh_config.json)."""
    return sorted(int(m.group(1)) for t in os.listdir(load_dir) if (m := _TAG_RE.match(t))
                  and os.path.isfile(os.path.join(load_dir, t, CONFIG_FILE)))


def _model_config(data: dict[str, Any], source: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{source}: unknown model fields {sorted(unknown)}: written by a newer "
                          "mesh-megatron? update this one")
    data = dict(data)
    if "learned_scalar_init" in data:
        data["learned_scalar_init"] = tuple(data["learned_scalar_init"])
    return ModelConfig(**data)


def open_checkpoint(load_dir: str, iteration: Optional[int] = None, flag: str = "--load") -> TrainingCheckpoint:
    """The checkpoint `latest` points at, or the given iteration; nothing is loaded yet
    (sizes are checked against the manifest; `verify_checkpoint` compares checksums)."""
    from mesh_megatron.paths import check_input_dir

    check_input_dir(load_dir, flag, "pass the --save directory of a training run")
    if iteration is None:
        tag = read_latest(load_dir, flag=flag)
    else:
        tag = tag_for(iteration)
        if not os.path.isfile(os.path.join(load_dir, tag, CONFIG_FILE)):
            have = available_iterations(load_dir) if os.path.isdir(load_dir) else []
            listed = ", ".join(map(str, have)) if have else "none"
            raise ConfigError(f"iteration {iteration} is not in {load_dir} (complete iterations: {listed}): "
                              "pass one of them to --iteration, or drop --iteration for the latest")
    config_path = os.path.join(load_dir, tag, CONFIG_FILE)
    try:
        with open(config_path) as f:
            meta = json.load(f)
        model = _model_config(meta["model"], config_path)
        sizes = meta.get("parallel", {})
        parallel = ParallelConfig(tensor_model_parallel_size=int(sizes.get("tensor_model_parallel_size", 1)),
                                  pipeline_model_parallel_size=int(sizes.get("pipeline_model_parallel_size", 1)),
                                  pipeline_split=sizes.get("pipeline_split"),
                                  virtual_pipeline_model_parallel_size=sizes.get("virtual_pipeline_model_parallel_size"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{config_path} is unreadable ({error_summary(e)}): the save was "
                          "interrupted or the file was edited; use another --iteration") from None
    tokenizer = meta.get("tokenizer") or {}
    tok_file = os.path.join(load_dir, tag, tokenizer["file"]) if tokenizer.get("file") else None
    return TrainingCheckpoint(load_dir=load_dir, tag=tag, iteration=int(meta.get("iteration", 0)),
                              model=model, parallel=parallel, tokenizer_type=tokenizer.get("type"),
                              tokenizer_file=tok_file, meta=meta)


def verify_checkpoint(ckpt: TrainingCheckpoint, flag: str = "--load", weights_only: bool = False) -> bool:
    """Check `ckpt` against its manifest as resume does: every file's size, and the SHA-256 of
    every file (`weights_only`: of the files a weights reader opens, the model-states files and
    the tokenizer). True when checked; False for a checkpoint that has no manifest (saved
    before manifests existed, or an older import). A damaged file is one ConfigError line."""
    from mesh_megatron.checkpoint.manifest import MANIFEST, verify_manifest

    if not os.path.isfile(os.path.join(ckpt.path, MANIFEST)):
        if "run_id" in ckpt.meta:  # a run's save always has one
            raise ConfigError(f"{flag} {ckpt.load_dir}: checkpoint {ckpt.tag} has no {MANIFEST} (the save did "
                              f"not finish); " + _other_iteration(ckpt))
        return False
    only = None
    if weights_only:
        only = [shard_name(pp * ckpt.tp + tp) for tp in range(ckpt.tp) for pp in range(ckpt.pp)]
        if ckpt.tokenizer_file:
            only.append(os.path.relpath(ckpt.tokenizer_file, ckpt.path))
    problem = verify_manifest(ckpt.path, checksums=True, only=only)
    if problem:
        raise ConfigError(f"{flag} {ckpt.load_dir}: checkpoint {ckpt.tag} is damaged ({problem}); "
                          + _other_iteration(ckpt))
    return True


def _other_iteration(ckpt: TrainingCheckpoint) -> str:
    from mesh_megatron.checkpoint.manager import previous_loadable

    prev = previous_loadable(ckpt.load_dir, ckpt.tag)
    if prev is None:
        return "re-copy it; no earlier checkpoint there is complete"
    return f"re-copy it, or pass --iteration {int(prev[5:])} (the previous complete checkpoint)"


def _load_shard(path: str) -> dict[str, Tensor]:
    """The module weights of one mp_rank file; a truncated or foreign file is one clear error."""
    try:
        states = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/... on bad bytes
        raise ConfigError(f"{path} is truncated or corrupt (torch.load: {error_summary(e)}): re-copy the "
                          "checkpoint or export another iteration with --iteration") from None
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict):
        raise ConfigError(f"{path} has no 'module' state dict: it is not a DeepSpeed model-states file")
    return {k: v for k, v in module.items() if isinstance(v, Tensor) and not is_ignored(k)}


def shard_paths(ckpt: TrainingCheckpoint) -> list[list[str]]:
    """[tp_rank][pp_rank] -> the mp_rank file; a missing one is a clear error."""
    paths = []
    for tp_rank in range(ckpt.tp):
        row = []
        for pp_rank in range(ckpt.pp):
            mp = pp_rank * ckpt.tp + tp_rank
            path = os.path.join(ckpt.path, shard_name(mp))
            if not os.path.isfile(path):
                raise ConfigError(
                    f"{ckpt.path} is missing {shard_name(mp)} (tensor rank {tp_rank}, pipeline stage "
                    f"{pp_rank} of TP={ckpt.tp} x PP={ckpt.pp}): the save is incomplete; export another "
                    "iteration with --iteration")
            row.append(path)
        paths.append(row)
    return paths


def read_model_state(ckpt: TrainingCheckpoint, dtype: Optional[torch.dtype] = None,
                     progress: Optional[Callable[[Iterable], Iterable]] = None) -> dict[str, Tensor]:
    """The full model weights under training names, as a TP=1 model holds them.

    The padded vocabulary rows are kept as the checkpoint has them (a TP=2 run pads to a
    multiple of 256). `dtype` casts every tensor; None keeps the stored dtype. `progress`
    wraps the iteration over shard files (e.g. tqdm).
    """
    paths = shard_paths(ckpt)
    flat = [(tp_rank, path) for tp_rank, row in enumerate(paths) for path in row]
    per_tp: list[dict[str, Tensor]] = [{} for _ in range(ckpt.tp)]
    for tp_rank, path in (progress(flat) if progress else flat):
        for name, tensor in _load_shard(path).items():
            # Pipeline stages hold disjoint names: the union is the whole rank.
            per_tp[tp_rank].setdefault(name, tensor)

    config = with_padded_vocab_of(ckpt.model, ckpt.tp)
    skeleton = meta_model(config)
    dims = partition_dims(skeleton)
    names = set(per_tp[0])
    for tp_rank, part in enumerate(per_tp[1:], start=1):
        if set(part) != names:
            odd = sorted(set(part) ^ names)[:3]
            raise ConfigError(f"{ckpt.path}: tensor rank {tp_rank} holds other weights than rank 0 "
                              f"(e.g. {', '.join(odd)}): the shards are from different runs")
    state = {}
    for name in per_tp[0]:
        if name in dims and ckpt.tp > 1:
            state[name] = torch.cat([part[name] for part in per_tp], dim=dims[name])
        else:
            state[name] = per_tp[0][name]
        if dtype is not None:
            state[name] = state[name].to(dtype)
    check_weights(state, skeleton, ckpt.path)
    return state
