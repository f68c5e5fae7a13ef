#!/usr/bin/env python
"""Re-split a training checkpoint for another tensor / pipeline parallel layout.

Reads any checkpoint this project writes (any TP, PP, ZeRO stage), merges it into full
weights, and writes a weights-only checkpoint for the new layout, which
`pretrain_mesh.py --load NEW_DIR` starts from with the same TP/PP flags. The optimizer
state, LR schedule and data position restart (iteration 0).

  python tools/convert_checkpoint.py --load ckpt_pp2 --save ckpt_pp1 --pipeline-model-parallel-size 1
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
    p.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    args = p.parse_args(argv)

    import os

    from mesh_megatron.checkpoint.reader import open_checkpoint, read_model_state
    from mesh_megatron.checkpoint.writer import check_separate, prepare_output_dir, write_training_checkpoint
    from mesh_megatron.config import ConfigError, ParallelConfig, validate
    from mesh_megatron.parallel.pipeline_layout import build_layout, parse_split

    try:
        ckpt = open_checkpoint(args.load, args.iteration)
        split = parse_split(args.pipeline_split)
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        config = ckpt.model
        validate(config, ParallelConfig(tp, pp, split))
        build_layout(config, pp, split)
        state = read_model_state(ckpt)
        rows = state["embedding.word_embeddings.weight"].shape[0]
        if config.padded_vocab_size(tp) != rows:
            raise ConfigError(f"the checkpoint's {rows} vocabulary rows do not pad evenly for TP={tp} "
                              f"(vocab {config.vocab_size} -> {config.padded_vocab_size(tp)}): choose a TP "
                              f"size whose 128 x TP multiple gives {rows}")
        check_separate(args.save, args.load, "--save")
        prepare_output_dir(args.save, args.force, "--save")
        tokenizer = (ckpt.tokenizer_type, ckpt.tokenizer_file) if ckpt.tokenizer_file else None
        write_training_checkpoint(args.save, config, state, tensor_parallel_size=tp,
                                  pipeline_model_parallel_size=pp, pipeline_split=split, tokenizer=tokenizer,
                                  source={"converted_from": os.path.abspath(args.load),
                                          "iteration": ckpt.iteration})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.save} for TP={tp} PP={pp}: continue with pretrain_mesh.py --load {args.save} "
          f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}"
          + (f" --pipeline-split {args.pipeline_split}" if split else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
