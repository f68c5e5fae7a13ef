"""Save and resume through the DeepSpeed engine, atomically, keeping the last K.

Layout of a save directory:

    SAVE/iter_0000010/          DeepSpeed's files (model states per TP rank, ZeRO shards)
    SAVE/iter_0000010/tokenizer/          a copy of the run's tokenizer file
    SAVE/iter_0000010/mesh_config.json   model config, parallel sizes, tokenizer; written last
    SAVE/latest                 the tag of the newest *complete* checkpoint

A save writes its tag directory, then (rank 0) replaces `latest` with an atomic rename.
A crash before the rename leaves `latest` on the previous, complete checkpoint; the
half-written directory is removed by the next save or resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Optional

import torch.distributed as dist

from mesh_megatron.config import ConfigError, ModelConfig, ParallelConfig

LATEST = "latest"
CONFIG_FILE = "mesh_config.json"
_TAG_RE = re.compile(r"^iter_(\d{7})$")
# Test hook: "kill_during_save:N" SIGKILLs rank 0 while saving iteration N, after
# DeepSpeed wrote the tag's files and before `latest` moves: a crash mid-checkpoint.
FAULT_ENV = "MESH_MEGATRON_FAULT"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(load_dir: str, flag: str = "--load") -> str:
    """The tag `latest` points at; a clear error if there is no complete checkpoint.
    `flag` names the input in the message (the CLI flag or what the tool calls it)."""
    if not os.path.isdir(load_dir):
        raise ConfigError(f"{flag} {load_dir} does not exist: pass the --save directory of a training run")
    path = os.path.join(load_dir, LATEST)
    if not os.path.exists(path):
        raise ConfigError(f"{flag} {load_dir} holds no checkpoint (no '{LATEST}' file): pass the --save "
                          "directory of a training run that saved at least once, or drop --load to start fresh")
    tag = open(path).read().strip()
    if not os.path.isfile(os.path.join(load_dir, tag, CONFIG_FILE)):
        raise ConfigError(f"{flag} {load_dir}: '{LATEST}' names {tag!r}, which is missing or incomplete")
    return tag


def check_model_config(load_dir: str, tag: str, model: ModelConfig) -> None:
    """Refuse a checkpoint of another model before any weight is read."""
    with open(os.path.join(load_dir, tag, CONFIG_FILE)) as f:
        saved = json.load(f)["model"]
    ours = json.loads(json.dumps(dataclasses.asdict(model)))
    diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
    if diff:
        fields = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"--load {load_dir}/{tag} is from a different model config ({fields}); "
                          "pass the same --preset/--variant/--layout/--config as the run that saved it")


def check_parallel_layout(load_dir: str, tag: str, parallel: ParallelConfig) -> None:
    """DeepSpeed's files are per model-parallel rank: resuming needs the same TP and PP."""
    with open(os.path.join(load_dir, tag, CONFIG_FILE)) as f:
        saved = json.load(f).get("parallel", {})
    ours = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
            parallel.pipeline_split)
    theirs = (saved.get("tensor_model_parallel_size", 1), saved.get("pipeline_model_parallel_size", 1),
              saved.get("pipeline_split"))
    if ours != theirs:
        split = f" --pipeline-split {','.join(map(str, ours[2]))}" if ours[2] else ""
        raise ConfigError(
            f"--load {load_dir}/{tag} was saved with TP={theirs[0]} PP={theirs[1]} split={theirs[2]} but "
            f"this run uses TP={ours[0]} PP={ours[1]} split={ours[2]}: run with the saved sizes, or convert "
            f"the weights first with `python tools/convert_checkpoint.py --load {load_dir} --save NEW_DIR "
            f"--tensor-model-parallel-size {ours[0]} --pipeline-model-parallel-size {ours[1]}{split}` "
            "(weights only: optimizer, LR schedule and data position restart) and --load NEW_DIR")


class CheckpointManager:
    def __init__(self, save_dir: Optional[str], keep_last: int, parallel: ParallelConfig,
                 tokenizer_type: str, tokenizer_file: str):
        self.save_dir = save_dir
        self.keep_last = keep_last
        self.parallel = parallel
        self.tokenizer_type = tokenizer_type
        self.tokenizer_file = tokenizer_file

    def _tags(self) -> list[str]:
        return sorted(t for t in os.listdir(self.save_dir) if _TAG_RE.match(t))

    def _remove_incomplete(self) -> None:
        """Rank 0: delete tag directories newer than `latest` (left by a crashed save)."""
        latest_path = os.path.join(self.save_dir, LATEST)
        latest = open(latest_path).read().strip() if os.path.exists(latest_path) else ""
        for tag in self._tags():
            if tag > latest or not os.path.exists(os.path.join(self.save_dir, tag, CONFIG_FILE)):
                shutil.rmtree(os.path.join(self.save_dir, tag), ignore_errors=True)

    def save(self, engine, iteration: int, model: ModelConfig, client_state: dict[str, Any]) -> str:
        tag = tag_for(iteration)
        rank0 = dist.get_rank() == 0
        if rank0:
            os.makedirs(self.save_dir, exist_ok=True)
            self._remove_incomplete()
        dist.barrier()
        engine.save_checkpoint(self.save_dir, tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()
        if os.environ.get(FAULT_ENV) == f"kill_during_save:{iteration}" and rank0:
            os.kill(os.getpid(), 9)
        if rank0:
            tok_dir = os.path.join(self.save_dir, tag, "tokenizer")
            os.makedirs(tok_dir, exist_ok=True)
            tok_name = os.path.basename(self.tokenizer_file)
            shutil.copyfile(self.tokenizer_file, os.path.join(tok_dir, tok_name))
            meta = {"model": dataclasses.asdict(model), "iteration": iteration,
                    "parallel": dataclasses.asdict(self.parallel),
                    "tokenizer": {"type": self.tokenizer_type, "file": f"tokenizer/{tok_name}"}}
            _write_atomic(os.path.join(self.save_dir, tag, CONFIG_FILE), json.dumps(meta, indent=1))
            _write_atomic(os.path.join(self.save_dir, LATEST), tag)
            for old in self._tags()[:-self.keep_last]:
                shutil.rmtree(os.path.join(self.save_dir, old), ignore_errors=True)
        dist.barrier()
        return tag

    @staticmethod
    def load(engine, load_dir: str, tag: str) -> dict[str, Any]:
        """Resume a run; or, for a weights-only checkpoint (an import, see writer.py), load the
        module weights alone and return {"weights_only": True}: fresh optimizer, iteration 0."""
        weights_only = is_weights_only(load_dir, tag)
        path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=not weights_only,
                                                    load_lr_scheduler_states=not weights_only,
                                                    load_module_only=weights_only)
        if path is None:
            raise ConfigError(f"--load {load_dir}/{tag}: DeepSpeed could not read the checkpoint")
        return {"weights_only": True} if weights_only else client_state


def is_weights_only(load_dir: str, tag: str) -> bool:
    """True for checkpoints that hold module weights only (mesh_config.json "weights_only")."""
    with open(os.path.join(load_dir, tag, CONFIG_FILE)) as f:
        return bool(json.load(f).get("weights_only", False))
