"""Reshard a training checkpoint *with* its optimizer: ZeRO shards -> DeepSpeed's universal format.

A run that loses nodes continues on another TP / PP / data-parallel layout with its Adam
moments, LR schedule position, data position (iteration, consumed samples) and RNG states.
This file merges the source's ZeRO-1/2 partitions into one full (TP=1) tensor per parameter
and writes them in the layout DeepSpeed's own universal-checkpoint loader reads
(`"checkpoint": {"load_universal": true}`, the format of deepspeed.checkpoint.ds_to_universal),
so slicing for the new layout is done by DeepSpeed at load on every rank.

Source, any ZeRO-1/2 checkpoint this project writes (mp = pp_rank * TP + tp_rank):

    SRC/iter_N/zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt   (bf16 ZeRO-1: bf16_zero_pp_rank_...,
                                                   DeepSpeed's BF16_Optimizer, same keys)
        ["optimizer_state_dict"]["param_slice_mappings"][group][name] = fragment (start, numel)
        ["optimizer_state_dict"]["single_partition_of_fp32_groups"][group]   flat fp32 master
        ["optimizer_state_dict"]["base_optimizer_state"]["state"][group]     exp_avg, exp_avg_sq, step
    SRC/iter_N/mp_rank_{mp:02d}_model_states.pt   lr_scheduler, global_steps, client state
                                                   (iteration, consumed_samples, rng)

A parameter's TP-local tensor is its fragments concatenated in data-parallel order (ZeRO
partitions each flat group contiguously); TP shards concatenate along megatron's partition
dim; pipeline stages hold disjoint names. Target:

    DST/iter_N/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt   {"param": full tensor, "cat_dim": TP dim}
    DST/iter_N/zero/<param>/step.pt                        Adam's step count
    DST/iter_N/zero/optimizer_state.pt                     ZeRO's global state and param_groups
    DST/iter_N/mp_rank_{mp:02d}_model_states.pt            per *target* rank: module shard (so
        readers and exports work unchanged), lr_scheduler, global_steps, client state
    DST/iter_N/mesh_config.json                            target sizes, "universal": true

<param> is the target's optimizer name for the parameter: the global name, or
"chunks.{v}.<name>" for a rank holding several interleaved model chunks.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Any, Optional

import torch
from torch import Tensor

from mesh_megatron.checkpoint.manager import CONFIG_FILE, LATEST, _write_atomic, tag_problem
from mesh_megatron.checkpoint.manifest import MANIFEST, build_manifest
from mesh_megatron.checkpoint.reader import TrainingCheckpoint, read_model_state, shard_name
from mesh_megatron.checkpoint.skeleton import meta_model, module_state, with_padded_vocab_of
from mesh_megatron.checkpoint.tensor_parallel import partition_dims, shard_state_dict
from mesh_megatron.config import ConfigError, ParallelConfig

UNIVERSAL = "universal"
_CHUNK_PREFIX = re.compile(r"^chunks\.\d+\.")
# ZeRO-1/2's files, and at bf16 ZeRO-1 those of DeepSpeed's BF16_Optimizer ("bf16_" prefix,
# the same keys: param_slice_mappings, single_partition_of_fp32_groups, base_optimizer_state).
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_STATES = ("fp32", "exp_avg", "exp_avg_sq")


def is_universal(load_dir: str, tag: str) -> bool:
    with open(os.path.join(load_dir, tag, CONFIG_FILE)) as f:
        return bool(json.load(f).get(UNIVERSAL, False))


def optimizer_files(ckpt: TrainingCheckpoint) -> dict[int, list[str]]:
    """mp rank -> its ZeRO partition files in data-parallel order; {} for a checkpoint without
    ZeRO optimizer shards (ZeRO-0 keeps Adam in the mp_rank file, an import has none)."""
    found: dict[int, dict[int, str]] = {}
    for path in glob.glob(os.path.join(ckpt.path, "*zero_pp_rank_*_mp_rank_*_optim_states.pt")):
        m = _OPTIM_FILE.match(os.path.basename(path))
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    out = {}
    for mp, by_dp in found.items():
        if sorted(by_dp) != list(range(len(by_dp))):
            raise ConfigError(f"{ckpt.path}: ZeRO files of model-parallel rank {mp} are incomplete (data-parallel "
                              f"ranks {sorted(by_dp)}): the save was interrupted; use another --iteration")
        out[mp] = [by_dp[dp] for dp in range(len(by_dp))]
    if out and sorted(out) != list(range(ckpt.tp * ckpt.pp)):
        raise ConfigError(f"{ckpt.path}: ZeRO files exist for model-parallel ranks {sorted(out)} of "
                          f"TP={ckpt.tp} x PP={ckpt.pp}: the save is incomplete; use another --iteration")
    return out


def _torch_load(path: str) -> Any:
    from mesh_megatron.checkpoint.reader import error_summary

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign bytes
        raise ConfigError(f"{path} is truncated or corrupt (torch.load: {error_summary(e)}): re-copy the "
                          "checkpoint or use another --iteration") from None


def _merge_data_parallel(files: list[str]) -> tuple[dict[str, dict[str, Tensor]], Any, dict[str, Any]]:
    """One model-parallel rank's ZeRO partitions -> {name: {state: flat TP-local tensor}}, the
    Adam step, and the optimizer's global state (param_groups, clip_grad, ds_version, ...)."""
    pieces: dict[str, dict[str, list[Tensor]]] = {}
    steps, step, common = set(), None, None
    for path in files:  # data-parallel order: fragments concatenate in this order
        optim = _torch_load(path)["optimizer_state_dict"]
        groups = optim["base_optimizer_state"]["state"]
        for g, mapping in enumerate(optim["param_slice_mappings"]):
            flat = {"fp32": optim["single_partition_of_fp32_groups"][g],
                    "exp_avg": groups[g]["exp_avg"], "exp_avg_sq": groups[g]["exp_avg_sq"]}
            steps.add(float(groups[g]["step"]))
            step = groups[g]["step"] if step is None else step
            for name, frag in mapping.items():
                name = _CHUNK_PREFIX.sub("", name)
                for key in _STATES:
                    pieces.setdefault(name, {}).setdefault(key, []).append(
                        flat[key].narrow(0, frag.start, frag.numel))
        if common is None:
            common = {k: v for k, v in optim.items() if k not in
                      ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings")}
            common["param_groups"] = optim["base_optimizer_state"]["param_groups"]
    if len(steps) != 1:
        raise ConfigError(f"{files[0]}: parameter groups are at different Adam steps {sorted(steps)}")
    return {n: {k: torch.cat(v) for k, v in s.items()} for n, s in pieces.items()}, step, common


def read_optimizer_state(ckpt: TrainingCheckpoint) -> tuple[dict[str, dict[str, Tensor]], Any, dict[str, Any]]:
    """Full (TP=1) fp32 master weights and Adam moments per parameter name, the step, and
    ZeRO's global optimizer state."""
    files = optimizer_files(ckpt)
    if not files:
        raise ConfigError(f"{ckpt.path} holds no ZeRO-1/2 optimizer shards (a ZeRO-0 run or an import): "
                          "pass --weights-only to convert its weights alone")
    skeleton = meta_model(with_padded_vocab_of(ckpt.model, ckpt.tp))
    dims = partition_dims(skeleton)
    shapes = {n: p.shape for n, p in skeleton.named_parameters()}
    per_tp: list[dict[str, dict[str, Tensor]]] = [{} for _ in range(ckpt.tp)]
    step, common = None, None
    for mp, dp_files in sorted(files.items()):
        states, mp_step, mp_common = _merge_data_parallel(dp_files)
        if step is not None and float(mp_step) != float(step):
            raise ConfigError(f"{ckpt.path}: model-parallel ranks are at different Adam steps: shards of different runs")
        step, common = mp_step, common or mp_common
        per_tp[mp % ckpt.tp].update(states)  # stages hold disjoint names
    full = {}
    for name, shape in shapes.items():
        if name not in per_tp[0]:
            raise ConfigError(f"{ckpt.path}: no optimizer state for {name}: the shards are from another model")
        if name in dims and ckpt.tp > 1:
            local = list(shape)
            local[dims[name]] //= ckpt.tp
            full[name] = {k: torch.cat([part[name][k].view(local) for part in per_tp], dim=dims[name])
                          for k in _STATES}
        else:  # replicated across TP ranks: rank 0's copy, as megatron's merge does
            full[name] = {k: per_tp[0][name][k].view(shape) for k in _STATES}
    return full, step, common


def _target_names(config, parallel: ParallelConfig) -> dict[str, str]:
    """global name -> the name the target run's optimizer knows the parameter by."""
    vp = parallel.virtual_pipeline_model_parallel_size or 1
    if vp == 1:
        return {n: n for n, _ in meta_model(config).named_parameters()}
    from mesh_megatron.parallel.pipeline_layout import build_layout

    layout = build_layout(config, parallel.pipeline_chunks, parallel.pipeline_split, uniform_boundaries=True)
    pp = parallel.pipeline_model_parallel_size
    out = {}
    for c, stage in enumerate(layout.stages):  # chunk c runs on pipeline rank c % PP as chunk c // PP
        for n, _ in meta_model(config, stage).named_parameters():
            out[n] = f"chunks.{c // pp}.{n}"
    return out


def _resharded_recipe(recipe: Optional[dict], parallel: ParallelConfig, save_dir: str) -> Optional[dict]:
    """The source's recorded recipe with the new layout, saving here: `--load NEW_DIR` alone
    then continues the run on the resharded layout instead of asking for the old one."""
    if not recipe:
        return recipe
    split = parallel.pipeline_split
    return dict(recipe,
                parallel=dict(recipe.get("parallel", {}),
                              tensor_model_parallel_size=parallel.tensor_model_parallel_size,
                              pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
                              virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
                              pipeline_split=",".join(map(str, split)) if split else None),
                checkpoints=dict(recipe.get("checkpoints", {}), save=os.path.abspath(save_dir)))


def write_universal_checkpoint(ckpt: TrainingCheckpoint, save_dir: str, parallel: ParallelConfig,
                               tokenizer: Optional[tuple[str, str]] = None, *, verified: bool,
                               final_dir: Optional[str] = None) -> str:
    """Write `ckpt` with its optimizer for `parallel` (TP, PP, split, VP); any data-parallel
    size loads it. Returns the tag (the source's iteration).

    `verified`: every source file matched its manifest's SHA-256 (reader.verify_checkpoint);
    only then does the output get a manifest of its own, so an unchecked source is never
    certified. `final_dir`: where the output will live once renamed into place (the recorded
    recipe's --save), when `save_dir` is a temporary sibling."""
    from mesh_megatron.parallel.pipeline_layout import build_layout

    optim, step, common = read_optimizer_state(ckpt)
    weights = read_model_state(ckpt)
    config = with_padded_vocab_of(ckpt.model, ckpt.tp)
    dims = partition_dims(meta_model(config))
    tag_dir = os.path.join(save_dir, ckpt.tag)
    zero_dir = os.path.join(tag_dir, "zero")
    for name, target in _target_names(config, parallel).items():
        param_dir = os.path.join(zero_dir, target)
        os.makedirs(param_dir, exist_ok=True)
        for key in _STATES:
            entry = {"param": optim[name][key]}
            if name in dims:
                entry["cat_dim"] = dims[name]
            torch.save(entry, os.path.join(param_dir, f"{key}.pt"))
        torch.save(step, os.path.join(param_dir, "step.pt"))
    torch.save(common, os.path.join(zero_dir, "optimizer_state.pt"))

    # One model-states file per target rank: its module shard and the run's position.
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    stages = [None] if pp == 1 else build_layout(config, parallel.pipeline_chunks, parallel.pipeline_split,
                                                 uniform_boundaries=(parallel.virtual_pipeline_model_parallel_size or 1) > 1).stages
    for pp_rank in range(pp):
        rank_stages = [None] if stages == [None] else stages[pp_rank::pp]
        skeletons = [meta_model(config, s) for s in rank_stages]
        for tp_rank in range(tp):
            # The source rank whose position and RNG this rank continues: same TP rank where it
            # exists (the TP RNG stream is per TP rank), same stage index where it exists.
            src_mp = min(pp_rank, ckpt.pp - 1) * ckpt.tp + min(tp_rank, ckpt.tp - 1)
            states = _torch_load(os.path.join(ckpt.path, shard_name(src_mp)))
            module: dict[str, Any] = {}
            for sk in skeletons:
                names = sk.state_dict().keys()
                module.update(module_state(shard_state_dict({k: v for k, v in weights.items() if k in names},
                                                            sk, tp_rank, tp), sk))
            states.update(module=module, mp_world_size=tp * pp, param_shapes=None)
            torch.save(states, os.path.join(tag_dir, shard_name(pp_rank * tp + tp_rank)))

    if tokenizer is not None:
        kind, path = tokenizer
        os.makedirs(os.path.join(tag_dir, "tokenizer"), exist_ok=True)
        shutil.copyfile(path, os.path.join(tag_dir, "tokenizer", os.path.basename(path)))
    # The same run continues (its run id), so the manager's lineage and manifest rules hold:
    # the manifest first, mesh_config.json (the commit record) after it, `latest` last.
    meta = dict(ckpt.meta, parallel=dataclasses.asdict(parallel), **{UNIVERSAL: True},
                recipe=_resharded_recipe(ckpt.meta.get("recipe"), parallel, final_dir or save_dir),
                source={"resharded_from": os.path.abspath(ckpt.load_dir), "iteration": ckpt.iteration,
                        "parallel": ckpt.meta.get("parallel")})
    if verified:
        manifest = build_manifest(tag_dir, meta.get("run_id"), ckpt.iteration, skip={CONFIG_FILE})
        _write_atomic(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1))
    _write_atomic(os.path.join(tag_dir, CONFIG_FILE), json.dumps(meta, indent=1))
    _write_atomic(os.path.join(save_dir, LATEST), ckpt.tag)
    return ckpt.tag


def load_universal(engine, load_dir: str, tag: str) -> dict[str, Any]:
    """Resume from a resharded checkpoint through DeepSpeed's universal loader; the client
    state (iteration, consumed_samples, rng) as a normal resume returns it."""
    if not engine.zero_optimization():
        raise ConfigError(f"--load {load_dir}/{tag} is a resharded (universal) checkpoint, which DeepSpeed loads "
                          "under ZeRO stage 1 or 2: pass --ds_config examples/zero1.json or zero2.json")
    import torch.distributed as dist

    problem = [tag_problem(load_dir, tag, checksums=True) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise ConfigError(f"--load {load_dir}: checkpoint {tag} is damaged ({problem[0]}): convert the source "
                          "checkpoint again with tools/convert_checkpoint.py")
    # The same switch as "checkpoint": {"load_universal": true} in the ds_config, for this load only
    # (a later save writes ordinary per-rank files).
    engine._config.load_universal_checkpoint = True
    try:
        path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise ConfigError(f"--load {load_dir}/{tag}: DeepSpeed could not read the resharded checkpoint")
    return client_state
