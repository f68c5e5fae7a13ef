#!/usr/bin/env python
"""Print parameter counts, depths and training FLOPs per token of a MeSH model.

The model is built on the meta device: no weight memory, so pythia-1.4b costs nothing.

  python tools/model_summary.py --preset pythia-1.4b --variant mesh
  python tools/model_summary.py --preset pythia-410m --variant base --layout 3+6R3+3 --json
  python tools/model_summary.py --variant base --mean-recurrence 1,3,7 --backprop-depth 2

--mean-recurrence R1,R2,...: the expected training FLOPs/token of Huginn's random recurrence
(--recurrence-sampling poisson-lognormal, E[iterations] = R + 1) at each R, with the last
--backprop-depth k iterations backpropagated (model/accounting.py expected_flops_per_token).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def parse_args(argv=None) -> argparse.Namespace:
    from mesh_megatron.config import PRESETS, VARIANTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"model shape: one of {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--variant", default=None, help=f"state passing: one of {', '.join(VARIANTS)} (default mesh)")
    p.add_argument("--layout", default=None,
                   help="recursion layout P+CrK+Q (e.g. 3+6R3+3); default: the preset's first")
    p.add_argument("--config", default=None,
                   help="YAML recipe or model config (as pretrain_mesh.py --config: read and validated the "
                        "same way); --preset/--variant/--layout given here override it")
    p.add_argument("--lora-rank", default=None,
                   help="relaxed sharing: LoRA rank per loop iteration (an integer or 'full'; default 0)")
    p.add_argument("--lora-targets", default=None, help="comma list of core linears with adapters (default all)")
    p.add_argument("--relax-biases", action="store_true", help="per-iteration bias deltas")
    p.add_argument("--relax-norms", action="store_true", help="per-iteration LayerNorm deltas")
    p.add_argument("--mor-capacities", default=None,
                   help="--variant mor: fraction of the tokens each loop iteration processes (default (K - r) / K); "
                        "FLOPs count the tokens processed")
    p.add_argument("--mor-routing", default=None,
                   help="--variant mor: expert-choice (default) or token-choice (FLOPs at the expected (K - r) / K "
                        "of the tokens per recursion: uniform depths, as a router at init routes)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="sequence length for the attention FLOPs term (default: the preset's)")
    p.add_argument("--pipeline", type=int, default=None,
                   help="also print the automatic stage split for N pipeline stages (compute shares, bubble)")
    p.add_argument("--mean-recurrence", default=None,
                   help="comma-separated R of --recurrence-sampling poisson-lognormal: expected train FLOPs/token "
                        "at each (E[iterations] = R + 1)")
    p.add_argument("--backprop-depth", type=int, default=None,
                   help="with --mean-recurrence: only the last k iterations backpropagate (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)


def recipe_model(args: argparse.Namespace):
    """The model of --config exactly as pretrain_mesh.py resolves it (training/recipe.py)."""
    from mesh_megatron.paths import check_input_file
    from mesh_megatron.training import recipe
    from mesh_megatron.training.arguments import build_parser

    check_input_file(args.config, "--config", "pass a YAML recipe or model config")
    argv = ["--config", args.config]
    for flag in ("preset", "variant", "layout"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", getattr(args, flag)]
    return recipe.model_config(recipe.resolve_args(build_parser, argv))


def summarize(args: argparse.Namespace) -> dict:
    from mesh_megatron.config import ConfigError, preset, to_transformer_config, validate
    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.model.accounting import ParameterCounts, training_flops_per_token
    from mesh_megatron.parallel.initialize import initialize_distributed
    from mesh_megatron.config import ParallelConfig
    from mesh_megatron.parallel.pipeline_layout import build_layout

    import dataclasses

    from mesh_megatron.model.accounting import adapter_params_per_position, effective_depths, processed_fractions

    if args.config:
        cfg = recipe_model(args)
    else:
        cfg = preset(args.preset or "tiny", args.variant or "mesh", args.layout)
    relax = {k: v for k, v in (("lora_rank", args.lora_rank), ("lora_targets", args.lora_targets),
                               ("relax_biases", args.relax_biases or None),
                               ("relax_norms", args.relax_norms or None),
                               ("mor_capacities", args.mor_capacities),
                               ("mor_routing", args.mor_routing)) if v is not None}
    if "lora_rank" in relax and relax["lora_rank"] != "full":
        try:
            relax["lora_rank"] = int(relax["lora_rank"])
        except ValueError:
            raise ConfigError(f"--lora-rank {relax['lora_rank']!r} is not an integer or 'full'") from None
    cfg = dataclasses.replace(cfg, **relax) if relax else cfg
    validate(cfg)
    by_recurrence = _by_mean_recurrence(cfg, args)
    initialize_distributed(ParallelConfig())
    with torch.device("meta"):
        model = MeshGPTModel(cfg, to_transformer_config(cfg, perform_initialization=False))
    counts = ParameterCounts.of(model)
    return {
        **counts.as_dict(),
        "compute_depth": cfg.compute_depth,
        "unique_depth": cfg.unique_depth,
        "flops_per_token": training_flops_per_token(cfg, args.seq_length),
        "lora_rank": cfg.lora_rank,
        "adapter_per_position": adapter_params_per_position(cfg),
        # 6 FLOPs per applied adapter parameter (forward + backward), in flops_per_token
        "adapter_flops_per_token": round(6 * sum(processed_fractions(cfg, args.seq_length))
                                         * adapter_params_per_position(cfg)),
        # Mixture-of-Recursions: per iteration the fraction of tokens processed (1 elsewhere), and
        # the layers per token the FLOPs count (matmuls, attention): P + C * sum f_r (+ f_r^2)
        "processed_fractions": list(processed_fractions(cfg, args.seq_length)),
        "effective_depth": list(effective_depths(cfg, args.seq_length)),
        # Context for the table (not part of the fixed JSON keys' meaning).
        "layout": str(cfg.parsed_layout),
        "variant": cfg.variant,
        "mor_routing": cfg.mor_routing if cfg.is_mor else None,
        "mesh_slots": cfg.slots,
        "hidden_size": cfg.hidden_size,
        "padded_vocab_size": cfg.padded_vocab_size(),
        "seq_length": args.seq_length or cfg.seq_length,
        **({"pipeline": build_layout(cfg, args.pipeline).report()} if args.pipeline else {}),
        **({"flops_per_token_by_mean_recurrence": by_recurrence} if by_recurrence else {}),
    }


def _by_mean_recurrence(cfg, args) -> dict:
    """{R: {expected_iterations, expected_with_grad, flops_per_token}} for --mean-recurrence."""
    from mesh_megatron.config import ConfigError, RecurrenceConfig, validate_recurrence
    from mesh_megatron.model.accounting import expected_flops_per_token
    from mesh_megatron.model.recurrence import expected_iterations

    if args.mean_recurrence is None:
        if args.backprop_depth is not None:
            raise ConfigError("--backprop-depth needs --mean-recurrence R1,R2,... (the R to count FLOPs at)")
        return {}
    out = {}
    for text in args.mean_recurrence.split(","):
        try:
            r = float(text)
        except ValueError:
            raise ConfigError(f"--mean-recurrence {args.mean_recurrence!r}: {text!r} is not a number; "
                              "pass comma-separated R, e.g. 1,3,7") from None
        rec = RecurrenceConfig("poisson-lognormal", r, args.backprop_depth)
        validate_recurrence(cfg, rec)
        n, g = expected_iterations(rec, cfg.parsed_layout.loops)
        out[text] = {"expected_iterations": n, "expected_with_grad": g,
                     "flops_per_token": expected_flops_per_token(cfg, rec, args.seq_length)}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from mesh_megatron.config import ConfigError

    try:
        summary = summarize(args)
    except ConfigError as e:
        from mesh_megatron.paths import fail

        return fail(e)
    if args.json:
        print(json.dumps(summary))
        return 0
    pipeline = summary.pop("pipeline", None)
    by_recurrence = summary.pop("flops_per_token_by_mean_recurrence", {})
    rows = [
        ("variant", summary["variant"]), ("layout", summary["layout"]),
        ("mesh slots", summary["mesh_slots"]), ("hidden", summary["hidden_size"]),
        ("padded vocab", summary["padded_vocab_size"]),
        ("total params", f"{summary['total']:,}"), ("embedding params", f"{summary['embedding']:,}"),
        ("non-embedding params", f"{summary['non_embedding']:,}"),
        ("router params", f"{summary['router']:,}"),
        ("LoRA rank", summary["lora_rank"]),
        ("adapter params (per loop / total)", f"{summary['adapter_per_position']:,} / {summary['adapter']:,}"),
        ("bias/norm delta params", f"{summary['delta']:,}"),
        ("adapter train FLOPs/token", f"{summary['adapter_flops_per_token']:,}"),
        ("compute depth", summary["compute_depth"]), ("unique depth", summary["unique_depth"]),
        *([("MoR routing", summary["mor_routing"] + (" (expected at uniform depths)" if summary["mor_routing"]
                                                     == "token-choice" else ""))] if summary["variant"] == "mor" else []),
        *([("MoR tokens processed per iteration", ", ".join(f"{f:.3g}" for f in summary["processed_fractions"])),
           ("MoR layers per token (matmul / attention)",
            " / ".join(f"{d:.3g}" for d in summary["effective_depth"]))] if summary["variant"] == "mor" else []),
        (f"train FLOPs/token (seq {summary['seq_length']})", f"{summary['flops_per_token']:,}"),
    ] + [(f"  at mean recurrence R={r} (E[n] {v['expected_iterations']:.2f}, E[grad] {v['expected_with_grad']:.2f})",
          f"{v['flops_per_token']:,.0f}") for r, v in by_recurrence.items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if pipeline:
        print(f"pipeline split over {args.pipeline} stages (automatic, by compute):")
        print(pipeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
