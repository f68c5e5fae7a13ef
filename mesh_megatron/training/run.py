"""`pretrain_mesh.py` end to end: parse -> init -> data -> model/engine -> train -> save -> sample."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch.distributed as dist

from mesh_megatron.config import ConfigError


def split_samples(train, data_parallel_size: int) -> tuple[int, int]:
    """(train, valid) samples to build: every step's global batch, and the validation
    micro-batches of every data-parallel rank (eval_iters x micro x DP; DP = world / (TP x PP))."""
    valid = max(1, train.eval_iters * train.micro_batch_size * data_parallel_size) if train.eval_interval else 0
    return train.train_iters * train.global_batch_size, valid


def _build_data(run):
    """(tokenizer, (train, valid)) for this run; the embedded corpus when no --data-path.

    Collective: the embedded corpus and the index caches are built once per filesystem that
    holds the cache (data/cache.py build_in_turn); a problem on any rank stops every rank.
    """
    from megatron.core import parallel_state

    from mesh_megatron.data.cache import build_in_turn, default_cache_dir
    from mesh_megatron.data.datasets import build_gpt_datasets
    from mesh_megatron.data.embedded import prepare_embedded_dataset
    from mesh_megatron.parallel.consensus import together
    from mesh_megatron.training.arguments import run_tokenizer

    tokenizer = together(lambda: run_tokenizer(run.data))
    if run.data.data_path:
        paths = run.data.data_path
    else:
        root = run.data.cache_dir or default_cache_dir()
        paths = [build_in_turn(root, lambda: prepare_embedded_dataset(run.data.cache_dir), "embedded corpus cache")]
    t = run.train
    train_samples, valid_samples = split_samples(t, parallel_state.get_data_parallel_world_size())
    built = build_gpt_datasets(
        paths, run.data.split, run.model.seq_length, t.seed,
        train_samples=train_samples, valid_samples=valid_samples,
        tokenizer=tokenizer, cache_dir=run.data.cache_dir,
        padded_vocab_size=run.model.padded_vocab_size(run.parallel.tensor_model_parallel_size),
    )
    return tokenizer, (built.train, built.valid)


def _claim_save(run, rank0: bool):
    """(claim or None, refusal or None), the refusal the same on every rank. Rank 0 claims
    --save, then repeats the reuse check of arguments.parse under the claim: a run that
    finished into the same new directory after this one was parsed is seen now."""
    from mesh_megatron.checkpoint.claim import SaveClaim
    from mesh_megatron.checkpoint.manager import check_save_dir

    claim, refusal = None, [None]
    if rank0:
        claim = SaveClaim(run.train.save)
        refusal[0] = claim.acquire()
        if refusal[0] is None:
            try:
                check_save_dir(run.train.save, run.train.load, run.overwrite_save)
            except ConfigError as e:
                refusal[0] = str(e)
    dist.broadcast_object_list(refusal, src=0)
    return claim, refusal[0]


def _check_save_visible(save: str) -> None:
    """Collective: refuse at start a --save that is not one directory for every rank.

    Every rank writes its own DeepSpeed files into --save and rank 0 alone writes the manifest,
    `latest` and the commit record; on node-local storage each node would hold a fragment and a
    resume would find no whole checkpoint anywhere. Rank 0 writes a marker; a rank that does
    not see it stops the run here, on every rank, before any training."""
    from mesh_megatron.parallel.consensus import visible_from_every_rank

    seen = visible_from_every_rank(save, keep_directory=False)
    blind = [r for r, s in enumerate(seen) if not s]
    if blind:
        ranks = ", ".join(map(str, blind[:8])) + (", ..." if len(blind) > 8 else "")
        raise ConfigError(
            f"--save {save} is not the same directory on every rank: rank{'s' if len(blind) > 1 else ''} "
            f"{ranks} of {len(seen)} do not see the file rank 0 wrote in it (node-local storage, or a "
            "relative path from different working directories): --save must be visible to every node; "
            "pass an absolute path on a filesystem every node mounts")


def _tag_to_load(load: Optional[str]) -> Optional[str]:
    """Collective: the tag every rank resumes from (None: start fresh), as rank 0 sees --load.

    Rank 0 decides and broadcasts, so no rank trains while another loads; then every rank
    checks that it sees that tag's files (sizes as recorded), and one that does not stops the
    whole run naming the path (node-local storage: --save/--load must be visible to every node)."""
    from mesh_megatron.checkpoint.manager import LATEST, read_latest, tag_problem
    from mesh_megatron.parallel.consensus import together

    if not load:
        return None
    decision = [None, None]
    if dist.get_rank() == 0 and os.path.exists(os.path.join(load, LATEST)):
        try:
            decision[0] = read_latest(load)
        except ConfigError as e:
            decision[1] = str(e)
    dist.broadcast_object_list(decision, src=0)
    tag, error = decision
    if error:
        raise ConfigError(error)
    if tag is None:
        return None

    def check() -> None:
        problem = tag_problem(load, tag)
        if problem:
            raise ConfigError(
                f"--load {load}: rank 0 resumes from {tag}, but at {os.path.abspath(os.path.join(load, tag))} "
                f"this rank finds that {problem}: --save (and --load) must be visible to every node; "
                "put them on a filesystem every node mounts")

    together(check)
    return tag


def main(argv: Optional[list[str]] = None) -> int:
    from mesh_megatron.training import arguments
    from mesh_megatron.paths import fail
    from mesh_megatron.training.trainer import NonFiniteLoss, Trainer

    from mesh_megatron.parallel import initialize

    try:
        initialize.adopt_launcher_env()  # srun without a launcher: ranks from SLURM_*
    except ConfigError as e:  # the ranks cannot meet: each says so
        return fail(str(e))
    try:
        run, problem = arguments.parse(argv), None
    except ConfigError as e:
        run, problem = None, str(e)
    if problem is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return fail(problem)

    import deepspeed

    from mesh_megatron.checkpoint.manager import CheckpointManager, lineage
    from mesh_megatron.parallel.consensus import first_error, together
    from mesh_megatron.training.preemption import EXIT_PREEMPTED, Preemption, process_start_time

    # The flags are checked on every rank (their files may differ per node); the ranks meet
    # first so that a problem seen on one node stops all of them with the same line.
    try:
        initialize.join_process_group(run.distributed_timeout_minutes if run else initialize.DEFAULT_TIMEOUT_MINUTES)
    except ConfigError as e:
        return fail(str(e))
    problem = first_error(problem)
    if problem is not None:
        initialize.destroy()
        return fail(problem)
    initialize.initialize_distributed(run.parallel, run.distributed_timeout_minutes)
    deepspeed.init_distributed(dist_backend=initialize.backend(), auto_mpi_discovery=False)
    initialize.set_seed(run.train.seed)
    trainer = None
    claim = None
    # From here SIGTERM/SIGINT (and --exit-duration-in-mins) mean: finish the step, save, exit 75.
    preemption = Preemption(run.exit_duration_in_mins, process_start_time(), run.preempt_grace_seconds).install()
    try:
        if run.train.save:  # one run per --save (checkpoint/claim.py), before anything is built
            claim, refusal = _claim_save(run, dist.get_rank() == 0)
            if refusal:
                return fail(refusal)
        try:
            if run.train.save and dist.get_world_size() > 1:
                together(lambda: _check_save_visible(run.train.save))
            tokenizer, datasets = _build_data(run)
            tag = _tag_to_load(run.train.load)
        except ConfigError as e:  # the same line on every rank (consensus.together)
            return fail(str(e))
        trainer = Trainer(run, datasets, tokenizer)
        if tag is not None:
            try:
                trainer.resume(run.train.load, tag)
            except ConfigError as e:  # a torn or corrupt checkpoint: one line, same on every rank
                return fail(str(e))
        elif run.train.load:  # --load DIR --save DIR, DIR without a checkpoint yet (arguments.parse)
            trainer.sinks.print(f"--load {run.train.load} holds no checkpoint yet: starting from iteration 0")
        from mesh_megatron.training.arguments import tokenizer_source

        checkpoints = CheckpointManager(run.train.save, run.train.keep_last, run.parallel,
                                        *tokenizer_source(run.data), run_id=lineage(run.train.save, run.train.load),
                                        overwrite=run.overwrite_save)
        try:
            trainer.fit(checkpoints, preemption)
        except NonFiniteLoss as e:
            return fail(str(e))
        if trainer.stopped:
            where = f"saved in {run.train.save}; continue with --load {run.train.save}" if run.train.save \
                else "nothing saved (no --save)"
            first = preemption.first_signal_at  # the earliest signal of any rank
            since = f", {time.monotonic() - first:.1f} s after the first rank's signal" if first is not None else ""
            trainer.sinks.print(f"exiting with status {EXIT_PREEMPTED} at iteration {trainer.iteration}{since}: {where}")
            return EXIT_PREEMPTED
        if run.train.sample_tokens and run.parallel.pipeline_model_parallel_size > 1:
            trainer.sinks.print("greedy sample skipped: it runs without pipeline parallelism")
        elif run.train.sample_tokens:
            text = trainer.greedy_sample(run.train.sample_prompt, run.train.sample_tokens)
            trainer.sinks.print(f"greedy sample: {text!r}")
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        initialize.destroy()
        preemption.uninstall()
        if claim is not None:
            claim.release()


if __name__ == "__main__":
    sys.exit(main())
