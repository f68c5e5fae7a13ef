"""`pretrain_mesh.py` end to end: parse -> init -> data -> model/engine -> train -> save -> sample."""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch.distributed as dist

from mesh_megatron.config import ConfigError


def _build_data(run, rank0: bool):
    """(tokenizer, (train, valid)) for this run; the embedded corpus when no --data-path.

    The embedded corpus is tokenized once into the cache by rank 0 while the others wait.
    """
    from mesh_megatron.data.datasets import build_gpt_datasets
    from mesh_megatron.data.embedded import embedded_prefix, prepare_embedded_dataset
    from mesh_megatron.training.arguments import run_tokenizer

    tokenizer = run_tokenizer(run.data)
    if run.data.data_path:
        paths = run.data.data_path
    else:
        if rank0:
            prepare_embedded_dataset(run.data.cache_dir)
        dist.barrier()
        paths = [embedded_prefix(run.data.cache_dir)]
    t = run.train
    dp = dist.get_world_size() // run.parallel.tensor_model_parallel_size
    built = build_gpt_datasets(
        paths, run.data.split, run.model.seq_length, t.seed,
        train_samples=t.train_iters * t.global_batch_size,
        valid_samples=max(1, t.eval_iters * t.micro_batch_size * dp) if t.eval_interval else 0,
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


def main(argv: Optional[list[str]] = None) -> int:
    from mesh_megatron.training import arguments
    from mesh_megatron.training.trainer import NonFiniteLoss, Trainer, fail

    try:
        run = arguments.parse(argv)
    except ConfigError as e:
        return fail(str(e))

    import deepspeed

    from mesh_megatron.checkpoint.manager import LATEST, CheckpointManager, lineage, read_latest
    from mesh_megatron.training.preemption import EXIT_PREEMPTED, Preemption, process_start_time
    from mesh_megatron.parallel.initialize import backend, destroy, initialize_distributed, set_seed

    initialize_distributed(run.parallel)
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
    set_seed(run.train.seed)
    rank0 = dist.get_rank() == 0
    trainer = None
    claim = None
    # From here SIGTERM/SIGINT (and --exit-duration-in-mins) mean: finish the step, save, exit 75.
    preemption = Preemption(run.exit_duration_in_mins, process_start_time()).install()
    try:
        if run.train.save:  # one run per --save (checkpoint/claim.py), before anything is built
            claim, refusal = _claim_save(run, rank0)
            if refusal:
                return fail(refusal)
        try:
            tokenizer, datasets = _build_data(run, rank0)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            return fail(str(e))
        trainer = Trainer(run, datasets, tokenizer)
        if run.train.load and os.path.exists(os.path.join(run.train.load, LATEST)):
            try:
                trainer.resume(run.train.load, read_latest(run.train.load))
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
            trainer.sinks.print(f"exiting with status {EXIT_PREEMPTED} at iteration {trainer.iteration}: {where}")
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
        destroy()
        preemption.uninstall()
        if claim is not None:
            claim.release()


if __name__ == "__main__":
    sys.exit(main())
