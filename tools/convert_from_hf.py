#!/usr/bin/env python
"""Import a GPT-NeoX (Pythia) Hugging Face directory as a training checkpoint.

  python tools/convert_from_hf.py --hf pythia-410m --save ckpt/pythia-410m            # vanilla, 24 layers
  python tools/convert_from_hf.py --hf pythia-410m --save ckpt/410m-mesh \\
      --layout 4+8R2+4 --variant mesh --init average                                  # recursive init

The checkpoint holds weights only (iteration 0, no optimizer state); continue with

  python pretrain_mesh.py --config CKPT/model.yaml --load CKPT --save NEW_DIR \\
      --data-path PREFIX --tokenizer-type hf --tokenizer-model CKPT/iter_0000000/tokenizer/tokenizer.json

(the exact line is printed). A recursive layout P+CrK+Q must satisfy P + C*K + Q = the
source's layers. Prelude/coda come from the first P / last Q layers; core layer j from the
middle block M of C*K layers by --init: stepwise = M[j*K] (every K-th), average = mean of
M[t*C + j] over t (the layers the unrolled loop runs as core layer j), lower = M[j].
MeSH routers and learned scalars start from the training init (seeded by --seed). The
imported model has scale_embeddings off (Pythia has no embedding multiplier), so `vanilla`
reproduces transformers' logits. This project's own exports (mesh_gpt_neox) import as is.
--lora-rank r adds per-position adapters from the truncated SVD of each source layer's residual
against the tied core and prints the fraction of each residual's norm the rank keeps;
--lora-rank full (with biases and norms relaxed) reproduces the source model.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from mesh_megatron.conversion.from_hf import INIT_METHODS
    from mesh_megatron.config import VARIANTS
    from mesh_megatron.training.arguments import lora_rank

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True,
                   help="Hugging Face model directory: config.json + model.safetensors or pytorch_model.bin")
    p.add_argument("--save", required=True, help="training checkpoint directory to write (new or empty)")
    p.add_argument("--layout", default=None,
                   help="recursion layout P+CrK+Q with P + C*K + Q = the source's layers (default: a plain stack)")
    p.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="state passing of the imported model (default: vanilla)")
    p.add_argument("--init", default="stepwise", choices=list(INIT_METHODS),
                   help="how shared core layers are made from the middle vanilla layers (see above)")
    p.add_argument("--mesh-slots", type=int, default=None, help="MeSH buffer slots B (default K+3)")
    p.add_argument("--lora-rank", type=lora_rank, default=0,
                   help="relaxed sharing: per-position adapters from the truncated SVD of each source layer's "
                        "residual against the tied core (0 = off; 'full' = exact, with biases and norms relaxed)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling alpha / r (default alpha = r)")
    p.add_argument("--lora-targets", default=None, help="comma list of core linears with adapters (default all)")
    p.add_argument("--relax-biases", action="store_true", help="per-position bias deltas (exact residuals)")
    p.add_argument("--relax-norms", action="store_true", help="per-position LayerNorm deltas (exact residuals)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="training sequence length stored in the config (default: max_position_embeddings)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="write shards for this TP size (the run that loads it must use the same)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the fresh router / scalar init")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty --save")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mesh_megatron.conversion.from_hf import import_from_hf
    from mesh_megatron.config import ConfigError

    try:
        report = import_from_hf(args.hf, args.save, layout=args.layout, variant=args.variant, init=args.init,
                                mesh_slots=args.mesh_slots, seq_length=args.seq_length,
                                tensor_parallel_size=args.tensor_model_parallel_size, seed=args.seed,
                                force=args.force, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                lora_targets=args.lora_targets, relax_biases=args.relax_biases,
                                relax_norms=args.relax_norms)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = report.model
    print(f"imported {args.hf} ({report.source_type}) -> {report.save_dir}: {cfg.variant} {cfg.parsed_layout}, "
          f"hidden {cfg.hidden_size}, vocab rows {cfg.padded_vocab_size(args.tensor_model_parallel_size)}")
    if report.layer_sources and cfg.parsed_layout.is_looped:
        print("unique layer <- source layers: " + ", ".join(
            f"{u}<-{'+'.join(map(str, s))}" for u, s in enumerate(report.layer_sources)))
    if report.kept_fraction:
        fractions = list(report.kept_fraction.values())
        print(f"LoRA rank {cfg.lora_rank}: kept fraction of each residual's Frobenius norm "
              f"(min {min(fractions):.4f}, mean {sum(fractions) / len(fractions):.4f}):")
        for name, f in report.kept_fraction.items():
            print(f"  {name}: {f:.4f}")
    if not report.tokenizer:
        print("warning: no tokenizer.model / tokenizer.json in --hf: pass --tokenizer-model when training",
              file=sys.stderr)
    print(f"continue training with:\n  {report.resume_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
