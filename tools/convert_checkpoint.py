#!/usr/bin/env python
"""Reshard a training checkpoint for another tensor / pipeline / data-parallel layout.

By default the whole training state moves: weights, Adam moments, the LR schedule position,
the data position (iteration, consumed samples) and RNG states, in DeepSpeed's universal
checkpoint format (mesh_megatron/checkpoint/reshard.py). `pretrain_mesh.py --load NEW_DIR`
with the new TP/PP flags, under ZeRO-1 or 2 on any number of data-parallel ranks, continues
the run where it stopped. The source must be a ZeRO-1/2 checkpoint.

--weights-only writes the merged weights alone (any source, ZeRO-0 and imports included):
the run that loads it starts a new optimizer and LR schedule at iteration 0.

  python tools/convert_checkpoint.py --load ckpt_tp2 --save ckpt_tp1 --tensor-model-parallel-size 1
  python tools/convert_checkpoint.py --load ckpt_pp2 --save ckpt_pp1 --weights-only
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory written by pretrain_mesh.py --save")
    p.add_argument("--save", required=True, help="new directory for the converted checkpoint")
    p.add_argument("--iteration", type=int, default=None, help="which saved iteration (default: latest)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="target TP size")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="target PP size")
    p.add_argument("--pipeline-split", default=None, help="target compute layers per stage (default: balanced)")
    p.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="target model chunks per pipeline rank (interleaved schedule)")
    p.add_argument("--weights-only", action="store_true",
                   help="write the weights alone: the loading run restarts optimizer, LR schedule and data at 0")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    args = p.parse_args(argv)

    import os

    from mesh_megatron.checkpoint.reader import open_checkpoint, read_model_state, verify_checkpoint
    from mesh_megatron.checkpoint.reshard import optimizer_files, write_universal_checkpoint
    from mesh_megatron.checkpoint.writer import write_training_checkpoint
    from mesh_megatron.config import ConfigError, ParallelConfig, validate
    from mesh_megatron.parallel.pipeline_layout import build_layout, parse_split
    from mesh_megatron.paths import atomic_dir, check_output_dir, check_separate, fail

    try:
        # Cheap checks first: where the output goes, then the source's metadata and layout.
        check_separate(args.save, args.load, "--save")
        check_output_dir(args.save, "--save", force=args.force)
        ckpt = open_checkpoint(args.load, args.iteration)
        split = parse_split(args.pipeline_split)
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        config = ckpt.model
        vp = args.virtual_pipeline_model_parallel_size
        parallel = ParallelConfig(tp, pp, split, virtual_pipeline_model_parallel_size=vp)
        validate(config, parallel)
        build_layout(config, parallel.pipeline_chunks, split, uniform_boundaries=(vp or 1) > 1)
        if vp and args.weights_only:
            raise ConfigError("--virtual-pipeline-model-parallel-size is for the full reshard: drop --weights-only")
        if not args.weights_only and not optimizer_files(ckpt):
            raise ConfigError(f"{ckpt.path} holds no ZeRO-1/2 optimizer shards (a ZeRO-0 run or an import), so "
                              "only its weights can move: pass --weights-only")
        # Every file this conversion reads matches its SHA-256, or nothing is written: the
        # output's manifest must never certify a damaged source.
        verified = verify_checkpoint(ckpt, weights_only=args.weights_only)
        state = read_model_state(ckpt)
        rows = state["embedding.word_embeddings.weight"].shape[0]
        if config.padded_vocab_size(tp) != rows:
            raise ConfigError(f"the checkpoint's {rows} vocabulary rows do not pad evenly for TP={tp} "
                              f"(vocab {config.vocab_size} -> {config.padded_vocab_size(tp)}): choose a TP "
                              f"size whose 128 x TP multiple gives {rows}")
        tokenizer = (ckpt.tokenizer_type, ckpt.tokenizer_file) if ckpt.tokenizer_file else None
        with atomic_dir(args.save, "--save") as tmp:
            if not args.weights_only:
                del state  # re-read with the optimizer
                write_universal_checkpoint(ckpt, tmp, parallel, tokenizer, verified=verified,
                                           final_dir=args.save)
            else:
                write_training_checkpoint(tmp, config, state, tensor_parallel_size=tp,
                                          pipeline_model_parallel_size=pp, pipeline_split=split,
                                          tokenizer=tokenizer, manifest=verified,
                                          source={"converted_from": os.path.abspath(args.load),
                                                  "iteration": ckpt.iteration})
    except ConfigError as e:
        return fail(e)
    if not verified:
        print(f"warning: {ckpt.path} has no manifest.json (saved before manifests): its checksums could not "
              f"be checked, so {args.save} gets no manifest either", file=sys.stderr)
    what = (f"weights only (iteration {ckpt.iteration} -> 0)" if args.weights_only else
            f"weights, optimizer, LR schedule, data position and RNG at iteration {ckpt.iteration}")
    print(f"wrote {args.save} for TP={tp} PP={pp}, {what}: continue with pretrain_mesh.py --load {args.save} "
          f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}"
          + (f" --pipeline-split {args.pipeline_split}" if split else "")
          + (f" --virtual-pipeline-model-parallel-size {vp}" if vp else "")
          + ("" if args.weights_only else " (ZeRO-1/2, any data-parallel size, same global batch)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
