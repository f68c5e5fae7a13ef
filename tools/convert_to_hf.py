#!/usr/bin/env python
"""Export a training checkpoint to a Hugging Face directory.

  python tools/convert_to_hf.py --load checkpoints/run1 --out hf/run1
  python tools/convert_to_hf.py --load checkpoints/run1 --iteration 2000 --out hf/run1-2000 --dtype bf16

TP/PP shards are merged; ZeRO-1/2 optimizer files are not needed. `vanilla` becomes
transformers' own GPT-NeoX (AutoModelForCausalLM.from_pretrained(dir), no remote code; the
sqrt(hidden) embedding multiplier, if on, is folded into embed_in). Looped variants become
MeshGPTNeoXForCausalLM with configuration_mesh.py + modeling_mesh.py next to the weights:
load them with trust_remote_code=True. The run's tokenizer is copied, plus a tokenizer.json /
tokenizer_config.json that AutoTokenizer loads offline.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True,
                   help="checkpoint directory written by pretrain_mesh.py --save (holds 'latest' and iter_*/)")
    p.add_argument("--out", required=True, help="directory to write the Hugging Face model to (new or empty)")
    p.add_argument("--iteration", type=int, default=None,
                   help="export this iteration instead of the one 'latest' points at")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the exported weights (default: the dtype the checkpoint stores)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (only once the new export is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mesh_megatron.conversion.to_hf import export_to_hf
    from mesh_megatron.config import ConfigError
    from mesh_megatron.paths import fail

    try:
        report = export_to_hf(args.load, args.out, iteration=args.iteration, dtype=args.dtype,
                              force=args.force, progress=not args.quiet)
    except ConfigError as e:
        return fail(e)
    remote = report.model_type != "gpt_neox"
    print(f"exported {report.source} -> {report.out_dir}: {report.model_type}, {report.tensors} tensors, "
          f"{str(report.dtype).replace('torch.', '')}")
    if report.tokenizer:
        print(f"tokenizer: {', '.join(report.tokenizer.files)}")
        if report.tokenizer.warning:
            print(f"warning: {report.tokenizer.warning}", file=sys.stderr)
    else:
        print("warning: the checkpoint names no tokenizer file: none exported", file=sys.stderr)
    print(f"load with: AutoModelForCausalLM.from_pretrained({report.out_dir!r}"
          + (", trust_remote_code=True)" if remote else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
