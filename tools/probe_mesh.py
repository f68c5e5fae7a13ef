#!/usr/bin/env python
"""Probe a model's states on held-out text: the diagnostics of docs/MESH_METHOD.md section 6.

  python tools/probe_mesh.py --load checkpoints/embedded-default --out probe/
  python tools/probe_mesh.py --load hf/run1 --out probe/ --data-path data/corpus --samples 128

For the states h_emb, h0, h_1 .. h_K, h_out of every sequence (vanilla: after every layer, or
at the depths of --layout), averaged over sequences:
  relative update of each block   2 |f(h) - h|_F / (|f(h)|_F + |h|_F)
  CKA between all states          RBF kernel over the sequence's tokens, sigma = median pairwise
                                  token distance of that state (sigma^2 = median squared distance)
  spectrum of each state          top-50 singular values / the largest
  state RMS                       sqrt(mean over tokens and channels of h^2) of each state
  MeSH routers                    mean write / read weight per step and slot
  MoR routers (key mor)           per recursion: kept fraction, score > 0.5 fraction, agreement, score histogram
                                  (token choice: processed fraction per recursion, tokens and mean router
                                  probability per depth, histogram of the chosen depth's probability)
Writes DIR/probe.json (keys states, relative_update, cka, spectrum, state_rms, routers, ...)
and relative_update.png, cka.png, spectrum.png, state_rms.png, routers.png (MeSH).

  python tools/probe_mesh.py --init-only --out probe0/ -- --variant mesh --seed 1234   # iteration 0

--init-only probes the model a `pretrain_mesh.py FLAGS` run starts from (its recipe, --seed
and init flags, after `--`), built in this process: no checkpoint is needed. The model runs in fp32, the
metrics in float64; training checkpoints of any TP/PP are merged first.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default=None,
                   help="training checkpoint directory (pretrain_mesh.py --save) or Hugging Face directory")
    p.add_argument("--init-only", action="store_true",
                   help="probe the initialisation of the run whose pretrain_mesh.py flags follow `--` "
                        "(instead of --load)")
    p.add_argument("--out", required=True, help="new or empty directory for probe.json and the plots")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (only once the new outputs are complete)")
    p.add_argument("--data-path", nargs="+", default=None,
                   help="indexed-dataset prefix(es) tokenized with the model's tokenizer (default: the "
                        "embedded corpus)")
    p.add_argument("--split", default="969,30,1", help="train,valid,test shares; the validation split is probed")
    p.add_argument("--samples", type=int, default=64, help="held-out sequences to average over")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sequence (default: the model's training length)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--iteration", type=int, default=None, help="training checkpoints: this iteration, not latest")
    p.add_argument("--layout", default=None,
                   help="vanilla only: read states at the depths of this P+CrK+Q (default: every layer)")
    p.add_argument("--seed", type=int, default=1234, help="dataset shuffling seed (training's default)")
    p.add_argument("--num-loops", type=int, default=None,
                   help="probe at this inference depth N (loop iterations) instead of the trained K: any N for "
                        "models without per-step weights (base, anchor..., mesh --mesh-routers shared)")
    p.add_argument("run_flags", nargs=argparse.REMAINDER, help="with --init-only, after --: pretrain_mesh.py flags")
    args = p.parse_args(argv)
    if args.run_flags[:1] == ["--"]:
        args.run_flags = args.run_flags[1:]
    if args.init_only == bool(args.load):
        p.error("give --load DIR (a saved model) or --init-only -- FLAGS (a run's initialisation), one of them")
    if args.run_flags and not args.init_only:
        p.error(f"unrecognized arguments: {' '.join(args.run_flags)} (pretrain_mesh.py flags go with --init-only)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mesh_megatron.analysis.probe import ProbeSettings, check_settings, run_probe, write_probe
    from mesh_megatron.config import ConfigError
    from mesh_megatron.paths import check_output_dir, check_separate, fail

    settings = ProbeSettings(samples=args.samples, seq_length=args.seq_length, batch_size=args.batch_size,
                             device=args.device, data_path=args.data_path, split=args.split, seed=args.seed,
                             iteration=args.iteration, vanilla_layout=args.layout,
                             init_flags=args.run_flags if args.init_only else None, num_loops=args.num_loops)
    try:
        check_settings(settings)
        if args.load:
            check_separate(args.out, args.load, "--out")
        check_output_dir(args.out, "--out", force=args.force)
        result = run_probe(args.load, settings)
        paths = write_probe(result, args.out)
    except ConfigError as e:
        return fail(e)
    model, data = result["model"], result["data"]
    print(f"probed {model['variant']} {model['layout']} ({model['source']}) on {data['samples']} x "
          f"{data['seq_length']} tokens of the {data['source']}")
    print("relative update: " + ", ".join(f"{b['block']} {b['mean']:.3f}" for b in result["relative_update"]))
    names = result["states"]
    print("state RMS: " + ", ".join(f"{r['state']} {r['mean']:.3f}" for r in result["state_rms"]))
    print("CKA of consecutive states: " + ", ".join(
        f"{a}~{b} {result['cka'][i][i + 1]:.3f}" for i, (a, b) in enumerate(zip(names, names[1:]))))
    if result["routers"]:
        r = result["routers"]
        print("mean read weight per step (slots 0..B-1): " + "; ".join(
            f"{s}: " + " ".join(f"{w:.2f}" for w in row) for s, row in zip(r["steps"], r["read"])))
    if result.get("mor") and result["mor"]["routing"] == "token-choice":
        m = result["mor"]
        print("MoR (token choice) per recursion: processed " + ", ".join(f"{f:.3f}" for f in m["kept_fraction"])
              + " | tokens per depth " + ", ".join(f"{f:.3f}" for f in m["depth_fraction"])
              + " | mean router probability per depth " + ", ".join(f"{f:.3f}" for f in m["mean_probability"]))
    elif result.get("mor"):
        m = result["mor"]
        print("MoR per recursion: kept " + ", ".join(f"{f:.3f}" for f in m["kept_fraction"])
              + " | router score > 0.5 among active " + ", ".join(f"{f:.3f}" for f in m["threshold_fraction"])
              + " | agreement with top-k " + ", ".join(f"{f:.3f}" for f in m["agreement"]))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
