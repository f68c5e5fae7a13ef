#!/usr/bin/env python
"""Variant ablation at matched compute with a token-budget sweep, through pretrain_mesh.py.

  python tools/ablate.py --variants base,anchor,mesh --preset tiny --layout 2+2R2+2 --hidden-size 128 \\
      --tokens 5e5,1e6,2e6 --seeds 2 --jobs 2 --out docs/ablation --runs-dir /tmp/ablation_runs
  python tools/ablate.py --quick --out /tmp/ablate_quick        # CI: 2 variants, 1 seed, tiny budgets
  python tools/ablate.py compare docs/ablation docs/ablation/study/lr1e-3   # one table of several --out

Every variant gets the same layout (vanilla: the layout unrolled into P + C*K + Q distinct
layers, so the compute depth is the same; `mor` at capacities below 1 processes fewer tokens per
iteration, so it runs at less compute: model_summary.py --variant mor gives its FLOPs/token), the same recipe, the same tokens and, per seed,
the same training and validation batches. One run per (variant, seed) trains to the largest
budget on one cosine schedule and is validated every `interval` steps on the same held-out
micro-batches; the budgets are multiples of that interval (so the smaller budgets are
mid-schedule points of the longest run, not separately tuned runs).

Outputs in --out: recipe.yaml (the shared recipe), results.json (one record per variant,
seed and budget with valid_loss, plus every evaluated point), results.md (mean +- sd per
budget, paired mesh-base / anchor-base differences, the crossover statement), loss_vs_tokens.png.
Resumable: a finished run (RUNS/<variant>-s<seed>/done.json) is not repeated; an interrupted
one continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPT = os.path.join(ROOT, "pretrain_mesh.py")
QUICK = dict(variants="base,mesh", preset="tiny", layout="1+2R2+1", hidden_size=32, tokens="256,512", seeds=1,
             seq_length=32, micro_batch_size=4, global_batch_size=4, eval_iters=1, lr=3e-3, min_lr=3e-4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="base,anchor,mesh", help="comma-separated variants (vanilla, base, anchor, mesh, ...)")
    p.add_argument("--preset", default="tiny", help="model preset (shape, vocab, seq length)")
    p.add_argument("--layout", default=None, help="recursive layout P+CrK+Q shared by every variant (default: the preset's)")
    p.add_argument("--hidden-size", type=int, default=None, help="override the preset's hidden size")
    p.add_argument("--num-attention-heads", type=int, default=None, help="override the preset's head count")
    p.add_argument("--tokens", default="1e6,3e6,1e7", help="comma-separated training-token budgets")
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant (1234, 1235, ...)")
    p.add_argument("--out", required=True, help="results directory (recipe.yaml, results.json/.md, PNG)")
    p.add_argument("--runs-dir", default=None, help="checkpoints and logs of the runs (default OUT/runs)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the preset's)")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup-fraction", type=float, default=0.01)
    p.add_argument("--eval-iters", type=int, default=6, help="validation micro-batches per evaluation")
    p.add_argument("--evals-per-budget", type=int, default=1,
                   help="validation points per smallest budget (a finer loss curve; budgets still exact)")
    p.add_argument("--ds-config", default="examples/zero0.json",
                   help="DeepSpeed config (relative paths: to the repository, where the runs start)")
    p.add_argument("--data-path", nargs="*", default=[], help="as pretrain_mesh.py (default: the embedded corpus)")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once (each gets cores / jobs threads and, with several GPUs, "
                        "its own GPU round-robin); results do not depend on it")
    p.add_argument("--arm", action="append", default=[], metavar="LABEL=VARIANT [FLAGS]",
                   help="one more arm beside --variants: a label, the variant and pretrain_mesh.py flags of its "
                        "own (they override the shared recipe), e.g. 'mesh-rinit=mesh --mesh-router-init base' "
                        "or 'base-lr1e-3=base --lr 1e-3'; repeatable; its runs live in RUNS/LABEL-sSEED")
    p.add_argument("--quick", action="store_true", help="CI: two variants, one seed, tiny model and budgets")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more pretrain_mesh.py flags for every run")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    from mesh_megatron.config import VARIANTS

    bad = [v for v in args.variants if v not in VARIANTS]
    # arms: label -> (variant, its own flags); a plain variant is an arm without flags
    args.arms = {v: (v, []) for v in args.variants}
    for spec in args.arm:
        label, _, rest = spec.partition("=")
        words = rest.split()
        label = label.strip()
        if not label or not words or words[0] not in VARIANTS or "/" in label or label in args.arms:
            p.error(f"--arm {spec!r}: give LABEL=VARIANT [FLAGS] with a new label (no '/') and a variant "
                    f"of {', '.join(VARIANTS)}")
        args.arms[label] = (words[0], words[1:])
        args.variants.append(label)
    if bad or not args.variants:
        p.error(f"--variants: need one or more of {', '.join(VARIANTS)} (or an --arm)"
                + (f"; unknown: {', '.join(bad)}" if bad else ""))
    try:
        args.tokens = sorted({int(float(t)) for t in args.tokens.split(",") if t.strip()})
    except ValueError:
        p.error(f"--tokens {args.tokens!r}: give comma-separated numbers such as 1e6,3e6")
    if not args.tokens or args.tokens[0] <= 0 or args.seeds < 1:
        p.error("--tokens must be positive and --seeds >= 1")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    args.extra = [a for a in args.extra if a != "--"]
    args.runs_dir = args.runs_dir or os.path.join(args.out, "runs")
    # Runs start in the repository (relative ds_config); the user's paths are resolved here.
    args.out, args.runs_dir = os.path.abspath(args.out), os.path.abspath(args.runs_dir)
    args.data_path = [p if _is_weight(p) else os.path.abspath(p) for p in args.data_path]
    if args.tokenizer_model:
        args.tokenizer_model = os.path.abspath(args.tokenizer_model)
    return args


def _is_weight(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------ plan
def recipe(args) -> dict:
    """The recipe shared by every run (pretrain_mesh.py --config); variant and seed are flags."""
    from mesh_megatron.config import preset

    model = {"preset": args.preset}
    if args.layout:
        model["layout"] = args.layout
    for key in ("hidden_size", "num_attention_heads", "seq_length"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    seq = args.seq_length or preset(args.preset).seq_length
    model["seq_length"] = seq
    training = dict(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                    lr=args.lr, min_lr=args.min_lr, lr_warmup_fraction=args.lr_warmup_fraction)
    data = {"data_path": list(args.data_path)}
    if args.tokenizer_model:
        data.update(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model)
    return {"model": model, "training": training, "parallel": {"ds_config": args.ds_config},
            "checkpoints": {"eval_iters": args.eval_iters, "log_interval": 10, "sample_tokens": 0,
                            "keep_last": 1}, "data": data}


def schedule(args, tokens_per_step: int) -> tuple[int, dict[int, int]]:
    """(eval interval in steps, {budget tokens: steps}); budgets rounded to interval multiples."""
    interval = max(1, round(args.tokens[0] / tokens_per_step / args.evals_per_budget))
    steps = {t: max(1, round(t / tokens_per_step / interval)) * interval for t in args.tokens}
    return interval, steps


# ------------------------------------------------------------------ runs
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_evals(log_path: str) -> dict[int, float]:
    """{step: valid loss} from a --log-jsonl file (a resumed run re-logs a step: last wins)."""
    evals: dict[int, float] = {}
    if os.path.exists(log_path):
        for line in open(log_path):
            r = json.loads(line)
            if "valid/loss" in r:
                evals[int(r["step"])] = float(r["valid/loss"])
    return evals


def job_env(slot: int, jobs: int) -> dict[str, str]:
    """What one of `jobs` concurrent runs gets: its share of the cores, and a GPU of its own
    (round-robin) when there are several. One job at a time: the defaults, untouched."""
    if jobs == 1:
        return {}
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))}
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % torch.cuda.device_count())
    return env


def train_all(args, recipe_path: str, train_iters: int, interval: int) -> list[dict]:
    """Every (variant, seed) run, `--jobs` at a time; results in (seed, variant) order."""
    order = [(v, 1234 + s) for s in range(args.seeds) for v in args.variants]
    import queue
    from concurrent.futures import ThreadPoolExecutor

    slots: queue.Queue = queue.Queue()
    for i in range(args.jobs):
        slots.put(i)

    def run(item):
        slot = slots.get()
        try:
            return train_one(args, recipe_path, *item, train_iters, interval, job_env(slot, args.jobs))
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(run, order))


def train_one(args, recipe_path: str, label: str, seed: int, train_iters: int, interval: int,
              extra_env: dict[str, str]) -> dict:
    """One arm's run (`label` names it; args.arms gives its variant and own flags)."""
    variant, arm_flags = args.arms[label]
    run_dir = os.path.join(args.runs_dir, f"{label}-s{seed}")
    done = os.path.join(run_dir, "done.json")
    if os.path.exists(done):
        print(f"[ablate] {label} seed {seed}: finished earlier, not repeated", flush=True)
        return json.load(open(done))
    os.makedirs(run_dir, exist_ok=True)
    ckpt, log = os.path.join(run_dir, "ckpt"), os.path.join(run_dir, "log.jsonl")
    cmd = [sys.executable, SCRIPT, "--config", recipe_path, "--variant", variant, "--seed", str(seed),
           "--train-iters", str(train_iters), "--eval-interval", str(interval), "--save-interval", str(interval),
           "--save", ckpt, "--log-jsonl", log, *args.extra, *arm_flags]
    if os.path.exists(os.path.join(ckpt, "latest")):
        cmd += ["--load", ckpt]
        print(f"[ablate] {label} seed {seed}: continuing from {ckpt}", flush=True)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **extra_env)
    print(f"[ablate] {label} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(os.path.join(run_dir, "stdout.txt"), "a") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = open(os.path.join(run_dir, "stdout.txt")).read()[-3000:]
        raise SystemExit(f"error: run {label} seed {seed} failed (exit {proc.returncode}); its output "
                         f"ends:\n{tail}\nfix it and rerun: finished runs are kept")
    result = {"variant": label, "seed": seed, "evals": read_evals(log), "seconds": time.time() - start,
              "checkpoint": ckpt}
    tmp = done + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, done)  # done.json appears only for a complete run
    return json.load(open(done))


# ------------------------------------------------------------------ report
def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _fmt(m: float, s: float) -> str:
    return f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}"


def summarize(args, runs: list[dict], steps: dict[int, int], tokens_per_step: int) -> tuple[list[dict], str]:
    records = []
    for r in runs:
        for budget, n in steps.items():
            records.append({"variant": r["variant"], "seed": r["seed"], "tokens": n * tokens_per_step,
                            "budget": budget, "iteration": n, "valid_loss": r["evals"][str(n)]})
    loss = {(r["variant"], r["seed"], r["budget"]): r["valid_loss"] for r in records}
    seeds = sorted({r["seed"] for r in runs})
    # paired differences to base: mesh, anchor, then every --arm
    arms = getattr(args, "arms", {})
    diffs = [v for v in ("mesh", "anchor", *args.variants) if "base" in args.variants and v in args.variants
             and (v in ("mesh", "anchor") or arms.get(v, (v, [])) != (v, []))]
    diffs = list(dict.fromkeys(diffs))
    lines = ["| " + " | ".join(["tokens", *args.variants, *(f"{v} - base" for v in diffs)]) + " |"]
    lines.append("|" + "---|" * (1 + len(args.variants) + len(diffs)))
    crossover = None
    mesh_diff: dict[int, tuple[float, float]] = {}  # tokens -> (mean, sd) of mesh - base
    for budget, n in steps.items():
        cells = [_fmt(*_mean_sd([loss[(v, s, budget)] for s in seeds])) for v in args.variants]
        for v in diffs:
            d = [loss[(v, s, budget)] - loss[("base", s, budget)] for s in seeds]
            m, sd = _mean_sd(d)
            cells.append(f"{m:+.4f} ± {sd:.4f}" if not math.isnan(sd) else f"{m:+.4f}")
            if v == "mesh":
                mesh_diff[n * tokens_per_step] = (m, sd)
                if crossover is None and m < 0:
                    crossover = n * tokens_per_step
        lines.append(f"| {n * tokens_per_step:,} | " + " | ".join(cells) + " |")
    if "mesh" in args.variants and "base" in args.variants:
        statement = (f"mesh first beats base (mean over seeds) at {crossover:,} training tokens."
                     if crossover is not None else "mesh does not beat base: not within the budgets run.")
        later = [t for t in mesh_diff if crossover is not None and t > crossover and mesh_diff[t][0] >= 0]
        if later:
            statement += f" It does not stay ahead: base is lower again at {', '.join(f'{t:,}' for t in later)}."
        within = [t for t, (m, sd) in mesh_diff.items() if not math.isnan(sd) and abs(m) <= sd]
        if within:
            statement += (" |mesh - base| is within one sd of the seeds at "
                          + ", ".join(f"{t:,}" for t in within) + " tokens.")
    else:
        statement = "mesh vs base: not compared (both variants are needed)."
    order = {}
    last = list(steps)[-1]
    for v in args.variants:
        order[v] = statistics.fmean(loss[(v, s, last)] for s in seeds)
    ranking = " < ".join(f"{v} ({order[v]:.4f})" for v in sorted(order, key=order.get))
    md = "\n".join([
        "# Variant ablation", "",
        f"Validation loss (mean ± sd over {len(seeds)} seed(s): {', '.join(map(str, seeds))}) after each "
        f"training-token budget; differences are paired per seed (same training and validation batches). "
        f"{tokens_per_step:,} tokens per step; one cosine schedule per run, to the largest budget.", "",
        *lines, "",
        f"**Crossover:** {statement}", "",
        f"**Ordering at the largest budget** (lower is better): {ranking}.", "",
        "Recipe: `recipe.yaml` (every run: `pretrain_mesh.py --config recipe.yaml --variant V --seed S`).", ""])
    return records, md


def plot(args, runs: list[dict], tokens_per_step: int, steps: dict[int, int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in args.variants:
        per_seed = [r["evals"] for r in runs if r["variant"] == v]
        common = sorted(set.intersection(*(set(map(int, e)) for e in per_seed)) - {0})
        xs = [n * tokens_per_step for n in common]
        vals = [[e[str(n)] for e in per_seed] for n in common]
        ax.plot(xs, [statistics.fmean(x) for x in vals], marker="o", ms=3, label=v)
        if len(per_seed) > 1:
            ax.fill_between(xs, [min(x) for x in vals], [max(x) for x in vals], alpha=0.2)
    for n in steps.values():
        ax.axvline(n * tokens_per_step, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    from mesh_megatron.config import preset

    shape = preset(args.preset, "base", args.layout)
    ax.set_title(f"{args.preset} {shape.layout} hidden {args.hidden_size or shape.hidden_size}: "
                 "mean over seeds (band: min-max)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    from mesh_megatron.paths import atomic_file

    with atomic_file(path, "--out") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_atomic(path: str, text: str) -> None:
    from mesh_megatron.paths import write_text

    write_text(path, text, "--out")


def check_paths(args, text: str) -> None:
    """--out and --runs-dir can be written (an existing --out only if it is this ablation's,
    to resume it), and every input the runs will read exists: before any run starts."""
    from mesh_megatron.config import ConfigError
    from mesh_megatron.data.datasets import parse_blend
    from mesh_megatron.data.validation import inspect_indexed_dataset
    from mesh_megatron.paths import check_input_file, check_json_file, check_output_dir

    check_output_dir(args.out, "--out", existing_ok=True, in_place=True)
    check_output_dir(args.runs_dir, "--runs-dir", existing_ok=True, in_place=True)
    recipe_path = os.path.join(args.out, "recipe.yaml")
    if os.path.isdir(args.out) and os.listdir(args.out) and not os.path.isfile(recipe_path):
        raise ConfigError(f"--out {args.out}: is not empty and holds no recipe.yaml (not an ablation's output); "
                          "pass a new directory, or the --out of the ablation to resume")
    if os.path.isfile(recipe_path) and open(recipe_path).read() != text and \
            os.path.isdir(args.runs_dir) and any(os.scandir(args.runs_dir)):
        raise ConfigError(f"--out {args.out}: its recipe.yaml holds another recipe than these flags and "
                          f"{args.runs_dir} has runs of it; use a new --out/--runs-dir, or the same flags to resume")
    check_json_file(args.ds_config, "--ds-config", "pass a DeepSpeed JSON config")
    if args.tokenizer_model:
        check_input_file(args.tokenizer_model, "--tokenizer-model", "pass the tokenizer the data was "
                         "preprocessed with")
    for prefix in parse_blend(args.data_path)[0] if args.data_path else []:
        try:
            inspect_indexed_dataset(prefix)
        except ValueError as e:
            raise ConfigError(f"--data-path: {e}") from None


def compare(dirs: list[str]) -> str:
    """One table over --out directories of one model and schedule (an LR sweep, an arm run
    later): each arm's loss at the largest budget, and its paired (per seed) difference to
    the `base` arm trained at the same peak LR in any of the directories."""
    from mesh_megatron.config import ConfigError

    loaded = {}
    for d in dirs:
        try:
            with open(os.path.join(d, "results.json")) as f:
                loaded[d] = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"compare {d}: no readable results.json ({type(e).__name__}); pass --out "
                              "directories of finished ablations") from None
    first = loaded[dirs[0]]
    for d, r in loaded.items():
        if (r["tokens_per_step"], r["budgets"], r["recipe"]["model"]) != \
                (first["tokens_per_step"], first["budgets"], first["recipe"]["model"]):
            raise ConfigError(f"compare {d}: another model, batch or budget list than {dirs[0]}; compare "
                              "ablations of one model and schedule")
    last = str(max(int(b) for b in first["budgets"]))

    def final(r, arm):  # {seed: loss at the largest budget}
        return {x["seed"]: x["valid_loss"] for x in r["records"] if x["variant"] == arm and str(x["budget"]) == last}

    def lr(r, arm):
        flags = r.get("arms", {}).get(arm, {}).get("flags", [])
        return float(flags[flags.index("--lr") + 1]) if "--lr" in flags else float(r["recipe"]["training"]["lr"])

    def base_of(d, rate):  # the directory's own base at that lr, else the one other directory's
        own = [d] if "base" in loaded[d]["variants"] and lr(loaded[d], "base") == rate else \
            [o for o, r in loaded.items() if "base" in r["variants"] and lr(r, "base") == rate]
        if len(own) > 1:
            raise ConfigError(f"compare: {', '.join(own)} each have a base arm at lr {rate:g}; compare one of them")
        return final(loaded[own[0]], "base") if own else {}

    rows = ["| ablation | arm | peak lr | seeds | loss | - base at that lr (paired) |", "|---|---|---|---|---|---|"]
    for d, r in loaded.items():
        for arm in r["variants"]:
            got, ref = final(r, arm), base_of(d, lr(r, arm))
            flags = " ".join(r.get("arms", {}).get(arm, {}).get("flags", []))
            diff = [got[s] - ref[s] for s in sorted(set(got) & set(ref))]
            cell = "-" if arm == "base" or not diff else \
                (f"{statistics.fmean(diff):+.4f}" + (f" ± {statistics.stdev(diff):.4f}" if len(diff) > 1 else "")
                 + f" (seeds {', '.join(str(s) for s in sorted(set(got) & set(ref)))})")
            rows.append(f"| {d} | {arm}{f' (`{flags}`)' if flags else ''} | {lr(r, arm):g} | "
                        f"{', '.join(map(str, sorted(got)))} | {_fmt(*_mean_sd(list(got.values())))} | {cell} |")
    tokens = first["budgets"][last] * first["tokens_per_step"]  # budgets: {budget: steps}
    return "\n".join([f"Validation loss at {tokens:,} tokens (mean ± sd over seeds).", "",
                      *rows])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # python tools/ablate.py compare DIR [DIR ...]
        from mesh_megatron.config import ConfigError
        from mesh_megatron.paths import fail

        if len(argv) < 2:
            return fail("compare: give one or more --out directories of finished ablations")
        try:
            print(compare(argv[1:]))
        except ConfigError as e:
            return fail(e)
        return 0
    args = parse_args(argv)
    os.chdir(ROOT)
    import yaml

    from mesh_megatron.config import ConfigError
    from mesh_megatron.paths import fail

    shared = recipe(args)
    recipe_path = os.path.join(args.out, "recipe.yaml")
    text = yaml.safe_dump(shared, sort_keys=False)
    try:
        check_paths(args, text)
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.runs_dir, exist_ok=True)
        write_atomic(recipe_path, text)
    except ConfigError as e:
        return fail(e)
    # Every variant must build and fit before hours of training start.
    from mesh_megatron.training import arguments

    import contextlib
    import io

    for label in args.variants:
        v, arm_flags = args.arms[label]
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the check's printed recipe is not wanted
                arguments.parse(["--config", recipe_path, "--variant", v, *args.extra, *arm_flags, "--print-config"],
                                world_size=1)
        except SystemExit as e:
            if e.code not in (0, None):
                return 2
        except ConfigError as e:
            return fail(f"arm {label}: {e}")
    tokens_per_step = shared["training"]["global_batch_size"] * shared["model"]["seq_length"]
    interval, steps = schedule(args, tokens_per_step)
    train_iters = max(steps.values())
    print(f"[ablate] {len(args.variants)} variants x {args.seeds} seeds, {tokens_per_step} tokens/step, "
          f"budgets {steps} (steps), validation every {interval} steps", flush=True)
    runs = train_all(args, recipe_path, train_iters, interval)
    records, md = summarize(args, runs, steps, tokens_per_step)
    command = "python tools/ablate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"command": command, "variants": args.variants,
               "arms": {label: {"variant": v, "flags": f} for label, (v, f) in args.arms.items()}, "seeds": [1234 + s for s in range(args.seeds)],
               "tokens_per_step": tokens_per_step, "eval_interval": interval,
               "budgets": {str(k): v for k, v in steps.items()}, "recipe": shared, "records": records,
               "curves": [{"variant": r["variant"], "seed": r["seed"], "seconds": r["seconds"],
                           "points": [{"tokens": int(k) * tokens_per_step, "valid_loss": val}
                                      for k, val in sorted(r["evals"].items(), key=lambda kv: int(kv[0]))]}
                          for r in runs]}
    # Each file whole or not at all (written beside it, renamed into place); results.json is the
    # record, results.md and the plot are derived from it.
    try:
        write_atomic(os.path.join(args.out, "results.json"), json.dumps(results, indent=1))
        write_atomic(os.path.join(args.out, "results.md"), md + f"\nCommand: `{command}`\n")
        plot(args, runs, tokens_per_step, steps, os.path.join(args.out, "loss_vs_tokens.png"))
    except ConfigError as e:
        return fail(e)
    print(md)
    print(f"[ablate] wrote {args.out}/results.json, results.md, loss_vs_tokens.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
