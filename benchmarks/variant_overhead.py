#!/usr/bin/env python
"""Training-step time and memory of each state-passing variant at matched compute.

Builds each variant of one preset (same compute depth), runs forward + backward on random
tokens and prints a table with the ratio to `base` and the loop-aware FLOPs. One process,
whatever device is present (CPU here; CUDA when available).

  python benchmarks/variant_overhead.py --preset tiny --seq-length 128 --batch 8
  python benchmarks/variant_overhead.py --preset pythia-160m --seq-length 512 --batch 2 --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--variants", default="vanilla,base,anchor,anchor_emb,mesh",
                   help="comma-separated variants to compare")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sample")
    p.add_argument("--batch", type=int, default=8, help="samples per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    args = p.parse_args()

    from mesh_megatron.config import ParallelConfig, preset, to_transformer_config
    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.model.accounting import ParameterCounts, training_flops_per_token
    from mesh_megatron.parallel.initialize import initialize_distributed, set_seed

    initialize_distributed(ParallelConfig())
    set_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for variant in args.variants.split(","):
        cfg = preset(args.preset, variant, seq_length=args.seq_length)
        model = MeshGPTModel(cfg, to_transformer_config(cfg), init_seed=0).to(device)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_length + 1), device=device)
        for _ in range(2):  # warm-up
            model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        step = (time.perf_counter() - start) / args.steps
        mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        counts = ParameterCounts.of(model)
        rows.append((variant, str(cfg.parsed_layout), counts.non_embedding, counts.router,
                     training_flops_per_token(cfg), step, args.batch * args.seq_length / step, mem))
        del model
    base = next((r[5] for r in rows if r[0] == "base"), rows[0][5])
    print(f"preset {args.preset}, seq {args.seq_length}, batch {args.batch}, device {device}, "
          f"{torch.get_num_threads()} threads, {args.steps} steps")
    print(f"{'variant':<12} {'layout':<9} {'non-emb params':>15} {'router':>8} {'FLOPs/token':>13} "
          f"{'s/step':>8} {'tokens/s':>9} {'vs base':>8} {'peak MiB':>9}")
    for v, layout, ne, router, flops, step, tps, mem in rows:
        print(f"{v:<12} {layout:<9} {ne:>15,} {router:>8,} {flops:>13,} {step:>8.4f} {tps:>9,.0f} "
              f"{step / base:>8.3f} {mem:>9.0f}")


if __name__ == "__main__":
    main()
