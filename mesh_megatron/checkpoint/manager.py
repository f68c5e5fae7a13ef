"""Save and resume through the DeepSpeed engine: atomic, verified, and never touching other runs.

Layout of a save directory:

    SAVE/iter_0000010/                    DeepSpeed's files (model states per TP/PP rank, ZeRO shards)
    SAVE/iter_0000010/save_in_progress.json   marker: written first, removed when the tag is complete
    SAVE/iter_0000010/tokenizer/<file>    a copy of the run's tokenizer file
    SAVE/iter_0000010/manifest.json       every file's size and SHA-256 (manifest.py)
    SAVE/iter_0000010/mesh_config.json    model config, parallel sizes, tokenizer, run id; the commit record
    SAVE/latest                           the tag of the newest *complete* checkpoint

A save (rank 0 unless noted) writes the marker, then (all ranks) DeepSpeed's files, then the
tokenizer copy, the manifest and mesh_config.json; removes the marker; and only then replaces
`latest` with an atomic rename. A crash at any point leaves `latest` on the previous, complete
checkpoint.

Ownership: every tag records the `run_id` of the lineage that wrote it (a fresh id per run, or
the id of the checkpoint it resumed from when --load and --save are the same directory).
Cleanup deletes only tags of this lineage: an interrupted save (marker present), a tag of an
abandoned future (a resumed run re-saving an iteration it reached before), and --keep-last
pruning. Tags of other runs are never deleted, except with --overwrite-save.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import signal
import time
import uuid
from typing import Any, Optional

import torch
import torch.distributed as dist

from mesh_megatron.checkpoint.manifest import MANIFEST, build_manifest, hash_files, verify_manifest
from mesh_megatron.config import ConfigError, ModelConfig, ParallelConfig

LATEST = "latest"
CONFIG_FILE = "mesh_config.json"
IN_PROGRESS = "save_in_progress.json"
_TAG_RE = re.compile(r"^iter_(\d{7})$")

# Test hook, "POINT:ITERATION[:RANK]" (comma-separated for several; RANK defaults to 0). At
# POINT of the save of ITERATION, that rank SIGKILLs itself (kill_*) or sends itself SIGTERM
# (sigterm_in_save: a second signal while a preemption save runs). Points, in save order:
#   kill_before_files      marker written, no DeepSpeed file yet
#   kill_torn_model        the model-states file is half written
#   kill_between_files     model-states file complete, optimizer (ZeRO) file not started
#   kill_after_files       all DeepSpeed files written (alias: kill_during_save), no tokenizer yet
#   kill_torn_tokenizer    the tokenizer copy is half written
#   kill_before_latest     the tag is complete (marker removed), `latest` not yet moved
# and, outside saves (training/preemption.py): sigterm_after_step:I (after step I) and
# sigterm_in_step:I.J (during step I, once micro-batch J of it is done; plain steps only),
# sigterm_launcher_in_step:I.J (the same moment, SIGTERM to the rank's parent: its launcher), and
# slow_micro_batch:SECONDS (every rank sleeps that long after each micro-batch of a step but
# its last: a step as long as a real model's, on a tiny one).
FAULT_ENV = "MESH_MEGATRON_FAULT"
_ALIASES = {"kill_during_save": "kill_after_files"}


def fault(point: str, iteration) -> None:
    """Fire the test hook of FAULT_ENV if it names this point, iteration (or "STEP.MICRO") and rank."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, it, *rank = spec.split(":")
        if _ALIASES.get(name, name) == point and it == str(iteration) \
                and int(rank[0] if rank else 0) == dist.get_rank():
            if point == "sigterm_launcher_in_step":
                # as a scheduler preempts a node: SIGTERM to this rank's launcher (torchrun's agent),
                # which forwards it to its ranks; wait for that to land before the step goes on
                os.kill(os.getppid(), signal.SIGTERM)
                time.sleep(1.0)
                return
            os.kill(os.getpid(), signal.SIGTERM if point.startswith("sigterm") else signal.SIGKILL)


def fault_seconds(point: str) -> float:
    """The SECONDS of a "POINT:SECONDS" test hook in FAULT_ENV, 0 when there is none."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, value = (spec.split(":") + [""])[:2]
        if name == point:
            return float(value)
    return 0.0


def _faulted(point: str, iteration: int) -> bool:
    return any(_ALIASES.get(s.split(":")[0], s.split(":")[0]) == point and int(s.split(":")[1]) == iteration
               for s in filter(None, os.environ.get(FAULT_ENV, "").split(",")))


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _tags(directory: str) -> list[str]:
    return sorted(t for t in os.listdir(directory) if _TAG_RE.match(t)) if os.path.isdir(directory) else []


def _latest_tag(directory: str) -> Optional[str]:
    try:
        with open(os.path.join(directory, LATEST)) as f:
            return f.read().strip()
    except OSError:
        return None


def tag_owner(tag_dir: str) -> Optional[str]:
    """The run id that wrote (or is writing) this tag; None when it cannot be proven."""
    for name in (IN_PROGRESS, CONFIG_FILE):
        meta = _read_json(os.path.join(tag_dir, name))
        if meta is not None:
            return meta.get("run_id")
    return None


def tag_problem(load_dir: str, tag: str, checksums: bool = False,
                share: Optional[tuple[int, int]] = None) -> Optional[str]:
    """None if `tag` is a complete checkpoint (sizes, and checksums if asked, as recorded;
    `share` (rank, ranks): only that rank's part of the checksums, see manifest.shares)."""
    tag_dir = os.path.join(load_dir, tag)
    if not _TAG_RE.match(tag) or not os.path.isdir(tag_dir):
        return "that directory does not exist"
    if os.path.exists(os.path.join(tag_dir, IN_PROGRESS)):
        return "its save did not finish (save_in_progress.json is still there)"
    meta = _read_json(os.path.join(tag_dir, CONFIG_FILE))
    if meta is None:
        return f"its {CONFIG_FILE} is missing or unreadable (the save did not finish)"
    if "run_id" not in meta and not os.path.isfile(os.path.join(tag_dir, MANIFEST)):
        return None  # an older save or import without a manifest: nothing recorded to check
    return verify_manifest(tag_dir, checksums, share=share)


def previous_loadable(load_dir: str, tag: str) -> Optional[str]:
    """The newest tag before `tag` whose files are all there (sizes checked)."""
    for older in reversed(_tags(load_dir)):
        if older < tag and tag_problem(load_dir, older) is None:
            return older
    return None


def _fallback_hint(load_dir: str, tag: str, flag: str) -> str:
    prev = previous_loadable(load_dir, tag)
    if prev is None:
        return f"no earlier checkpoint in {load_dir} is complete: start fresh without {flag}"
    return (f"the previous loadable checkpoint is {prev}: point {LATEST} at it "
            f"(echo {prev} > {os.path.join(load_dir, LATEST)})")


def read_latest(load_dir: str, flag: str = "--load") -> str:
    """The tag `latest` points at; a clear error if there is no complete checkpoint.
    `flag` names the input in the message (the CLI flag or what the tool calls it)."""
    if not os.path.isdir(load_dir):
        raise ConfigError(f"{flag} {load_dir} does not exist: pass the --save directory of a training run")
    tag = _latest_tag(load_dir)
    if tag is None:
        raise ConfigError(f"{flag} {load_dir} holds no checkpoint (no '{LATEST}' file): pass the --save "
                          "directory of a training run that saved at least once, or drop --load to start fresh")
    problem = tag_problem(load_dir, tag)
    if problem:
        raise ConfigError(f"{flag} {load_dir}: '{LATEST}' names {tag!r}, but {problem}; "
                          + _fallback_hint(load_dir, tag, flag))
    return tag


def holds_checkpoints(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, LATEST)) or bool(_tags(directory))


def same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def check_save_dir(save: Optional[str], load: Optional[str], overwrite: bool) -> None:
    """Before anything is built: `save` is (or can be created as) a writable directory, and
    does not hold another run's checkpoints unless it is also --load or --overwrite-save."""
    if not save:
        return
    from mesh_megatron.paths import check_output_dir

    check_output_dir(save, "--save", existing_ok=True, in_place=True)  # a file, under a file, read-only
    if holds_checkpoints(save) and not same_dir(save, load) and not overwrite:
        latest = _latest_tag(save)
        what = f"latest {latest}" if latest else ", ".join(_tags(save)[-3:])
        raise ConfigError(f"--save {save} already holds checkpoints ({what}) of another run: resume it with "
                          f"--load {save}, pass another --save directory, or --overwrite-save to replace them")


def lineage(save: Optional[str], load: Optional[str]) -> str:
    """This run's id in `save`: that of the checkpoint it resumes from the same directory (so
    cleanup and --keep-last treat its saves as ours), else a fresh one."""
    if same_dir(save, load):
        latest = _latest_tag(load)
        owner = tag_owner(os.path.join(load, latest)) if latest else None
        if owner is None:  # no checkpoint yet: the crashed first save of this same command, if any
            marked = [t for t in _tags(save) if os.path.exists(os.path.join(save, t, IN_PROGRESS))]
            owner = tag_owner(os.path.join(save, marked[-1])) if marked else None
        if owner:
            return owner
    return uuid.uuid4().hex[:16]


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
            f"this run uses TP={ours[0]} PP={ours[1]} split={ours[2]}: run with the saved sizes, or reshard "
            f"first with `python tools/convert_checkpoint.py --load {load_dir} --save NEW_DIR "
            f"--tensor-model-parallel-size {ours[0]} --pipeline-model-parallel-size {ours[1]}{split}` "
            "(optimizer, LR schedule and data position carried over; --weights-only for weights alone) "
            "and --load NEW_DIR")


def _torn_save(original, iteration: int):
    """checkpoint_engine.save for the kill_torn_model / kill_between_files hooks."""
    def save(state_dict, path):
        model_file = path.endswith("model_states.pt")
        if model_file and _faulted("kill_torn_model", iteration) and dist.get_rank() == 0:
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[:buffer.tell() // 2])
            fault("kill_torn_model", iteration)
        if not model_file:
            fault("kill_between_files", iteration)
        return original(state_dict, path)
    return save


class CheckpointManager:
    def __init__(self, save_dir: Optional[str], keep_last: int, parallel: ParallelConfig,
                 tokenizer_type: str, tokenizer_file: str, run_id: Optional[str] = None,
                 overwrite: bool = False):
        self.save_dir = save_dir
        self.keep_last = keep_last
        self.parallel = parallel
        self.tokenizer_type = tokenizer_type
        self.tokenizer_file = tokenizer_file
        self.run_id = run_id or uuid.uuid4().hex[:16]  # only rank 0's is used
        self.overwrite = overwrite
        self.hashed_by_rank: list[dict[str, dict]] = []
        self.last_save_s: Optional[float] = None

    def _path(self, tag: str) -> str:
        return os.path.join(self.save_dir, tag)

    def _prepare(self, tag: str) -> str:
        """Rank 0, before a save: clean up what this lineage left, make the tag and its marker.
        "save"; "skip" when `tag` is already the complete `latest` of this lineage; else an error."""
        os.makedirs(self.save_dir, exist_ok=True)
        latest = _latest_tag(self.save_dir)
        if tag == latest and tag_owner(self._path(tag)) == self.run_id \
                and tag_problem(self.save_dir, tag) is None:
            return "skip"
        for t in _tags(self.save_dir):
            owner = tag_owner(self._path(t))
            interrupted = os.path.exists(os.path.join(self._path(t), IN_PROGRESS))
            if t == latest and not interrupted:
                continue
            # Ours and interrupted, or ours from an abandoned future (we resumed from before it).
            if owner == self.run_id and (interrupted or t >= tag):
                shutil.rmtree(self._path(t))
            elif t == tag and self.overwrite:
                shutil.rmtree(self._path(t))
        if os.path.exists(self._path(tag)):
            return (f"--save {self.save_dir}: {tag} exists and was not written by this run; it is left "
                    "alone: move it away, or pass another --save directory")
        os.makedirs(self._path(tag))
        _write_atomic(os.path.join(self._path(tag), IN_PROGRESS),
                      json.dumps({"run_id": self.run_id, "pid": os.getpid()}))
        return "save"

    def _finish(self, tag: str, iteration: int, model: ModelConfig, client_state: dict[str, Any],
                hashed: Optional[dict[str, dict]] = None) -> None:
        """Rank 0, after every rank's DeepSpeed files: tokenizer, manifest, commit, publish, prune."""
        tok_dir = os.path.join(self._path(tag), "tokenizer")
        os.makedirs(tok_dir, exist_ok=True)
        tok_name = os.path.basename(self.tokenizer_file)
        if _faulted("kill_torn_tokenizer", iteration):
            with open(self.tokenizer_file, "rb") as src, open(os.path.join(tok_dir, tok_name), "wb") as dst:
                dst.write(src.read()[:os.path.getsize(self.tokenizer_file) // 2])
            fault("kill_torn_tokenizer", iteration)
        shutil.copyfile(self.tokenizer_file, os.path.join(tok_dir, tok_name))
        manifest = build_manifest(self._path(tag), self.run_id, iteration, skip={IN_PROGRESS, CONFIG_FILE},
                                  hashed=hashed)
        _write_atomic(os.path.join(self._path(tag), MANIFEST), json.dumps(manifest, indent=1))
        meta = {"model": dataclasses.asdict(model), "iteration": iteration,
                "parallel": dataclasses.asdict(self.parallel),
                "tokenizer": {"type": self.tokenizer_type, "file": f"tokenizer/{tok_name}"},
                "recipe": client_state.get("recipe"),  # --load DIR alone continues this run
                "run_id": self.run_id}
        _write_atomic(os.path.join(self._path(tag), CONFIG_FILE), json.dumps(meta, indent=1))
        os.remove(os.path.join(self._path(tag), IN_PROGRESS))
        fault("kill_before_latest", iteration)
        _write_atomic(os.path.join(self.save_dir, LATEST), tag)
        ours = [t for t in _tags(self.save_dir) if tag_owner(self._path(t)) == self.run_id
                and tag_problem(self.save_dir, t) is None]
        for old in ours[:-self.keep_last] if self.keep_last > 0 else []:
            if old != tag:
                shutil.rmtree(self._path(old))
        if self.overwrite:  # the user asked to replace the other runs' checkpoints
            for t in _tags(self.save_dir):
                if tag_owner(self._path(t)) != self.run_id:
                    shutil.rmtree(self._path(t))
            self.overwrite = False

    def save(self, engine, iteration: int, model: ModelConfig, client_state: dict[str, Any]) -> str:
        """Collective. After it, `hashed_by_rank` holds what each rank hashed (its own files)
        and `last_save_s` the wall time of this save on this rank."""
        start, self.last_save_s = time.monotonic(), None  # stays None when the save is skipped
        tag = tag_for(iteration)
        go = [self._prepare(tag) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(go, src=0)  # also orders the marker before every rank's files
        if go[0] == "skip":
            return tag
        if go[0] != "save":
            raise ConfigError(go[0])
        fault("sigterm_in_save", iteration)
        fault("kill_before_files", iteration)
        original = engine.checkpoint_engine.save
        inner = _torn_save(original, iteration) \
            if _faulted("kill_torn_model", iteration) or _faulted("kill_between_files", iteration) else original
        written: list[str] = []

        def recording_save(state_dict, path):
            out = inner(state_dict, path)
            written.append(os.fspath(path))
            return out

        engine.checkpoint_engine.save = recording_save
        try:
            engine.save_checkpoint(self.save_dir, tag=tag, client_state=client_state, save_latest=False)
        finally:
            engine.checkpoint_engine.save = original
        # Each rank hashes what it wrote, all at once (manifest.py); rank 0 merges.
        tag_dir = self._path(tag)
        rels = {os.path.relpath(p, tag_dir) for p in written}
        mine = hash_files(tag_dir, sorted(r for r in rels if not r.startswith(os.pardir)))
        self.hashed_by_rank = [None] * dist.get_world_size()
        dist.all_gather_object(self.hashed_by_rank, mine)  # also: every rank's files are written
        fault("kill_after_files", iteration)
        if dist.get_rank() == 0:
            merged = {rel: entry for part in self.hashed_by_rank for rel, entry in part.items()}
            self._finish(tag, iteration, model, client_state, hashed=merged)
        dist.barrier()
        self.last_save_s = time.monotonic() - start
        return tag

    @staticmethod
    def load(engine, load_dir: str, tag: str) -> dict[str, Any]:
        """Resume a run; or, for a weights-only checkpoint (an import, see writer.py), load the
        module weights alone and return {"weights_only": True}: fresh optimizer, iteration 0.

        Every file is verified against the tag's manifest first (sizes on every rank, each rank
        the SHA-256 of its share of the bytes) and all ranks stop with the same one-line error
        when something is torn or corrupt."""
        mine = tag_problem(load_dir, tag, checksums=True, share=(dist.get_rank(), dist.get_world_size()))
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, mine)
        problem = next((p for p in problems if p), None)
        if problem:
            raise ConfigError(f"--load {load_dir}: checkpoint {tag} is damaged ({problem}); "
                              + _fallback_hint(load_dir, tag, "--load"))
        weights_only = is_weights_only(load_dir, tag)
        try:
            path, client_state = engine.load_checkpoint(
                load_dir, tag=tag, load_optimizer_states=not weights_only,
                load_lr_scheduler_states=not weights_only, load_module_only=weights_only)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(f"--load {load_dir}: checkpoint {tag} could not be read ({type(e).__name__}: "
                              f"{first[:200]}); " + _fallback_hint(load_dir, tag, "--load")) from None
        if path is None:
            raise ConfigError(f"--load {load_dir}/{tag}: DeepSpeed could not read the checkpoint")
        return {"weights_only": True} if weights_only else client_state


def is_weights_only(load_dir: str, tag: str) -> bool:
    """True for checkpoints that hold module weights only (mesh_config.json "weights_only")."""
    with open(os.path.join(load_dir, tag, CONFIG_FILE)) as f:
        return bool(json.load(f).get("weights_only", False))
