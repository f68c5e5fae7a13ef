"""Combine the two ablations of methods_point.sh and the depth sweep of depth_sweep.sh into
results.md / results.json, loss_vs_flops.png and depth_sweep.png (docs/ablation/methods/).

Training FLOPs per token are tools/model_summary.py's (expected values for the random-recurrence
arms), for the recipe in fixed-vs-rr/recipe.yaml:
  base     model_summary.py --config R --variant base                                    11,403,264
  mesh     model_summary.py --config R --variant mesh                                    11,426,304
  base-rr  ... --variant base --mean-recurrence 1.54 --backprop-depth 2                  11,399,901
  mesh-rr  ... --variant mesh (+ mesh_routers: shared, mesh_step_embedding: true in R)
               --mean-recurrence 1.54 --backprop-depth 2                                 11,422,931
  mor      model_summary.py --config R --variant mor   (capacities 1, 0.5)                9,930,240
"""
import glob
import json
import os
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.environ.get("RUNS", "/work/ab_runs/r05")
FLOPS = {"base": 11_403_264, "mesh": 11_426_304, "base-rr": 11_399_901, "mesh-rr": 11_422_931, "mor": 9_930_240}
ARMS = ["base", "mesh", "base-rr", "mesh-rr", "mor"]
RUN_DIRS = {a: f"{RUNS}/{'mor' if a == 'mor' else 'main'}/{a}-s1234" for a in ARMS}


def curves() -> dict:
    out = {}
    for sub in ("fixed-vs-rr", "mor"):
        res = json.load(open(os.path.join(HERE, sub, "results.json")))
        for c in res["curves"]:
            out[c["variant"]] = {"points": c["points"], "seconds": c["seconds"]}
    return out


def executed_flops(arm: str):
    """Mean of the per-step executed FLOPs/token the training log records (random recurrence), if any."""
    path = os.path.join(RUN_DIRS[arm], "log.jsonl")
    xs = [json.loads(line).get("perf/flops_per_token") for line in open(path)] if os.path.exists(path) else []
    xs = [x for x in xs if x is not None]
    return (sum(xs) / len(xs), len(xs)) if xs else (None, 0)


def depth_table() -> dict:
    """{label: {n: loss or 'refused: ...'}} from depth/*.json and depth/*-nN.txt."""
    table: dict = {}
    for label in ARMS + ["mor-threshold"]:
        row = {}
        whole = os.path.join(HERE, "depth", f"{label}.json")
        if os.path.exists(whole):
            ppl = json.load(open(whole))["perplexity"]
            for d in ppl.get("depths", []):
                row[d["num_loops"]] = d["loss"]
            row["default"] = ppl["loss"]
        default = os.path.join(HERE, "depth", f"{label}-default.json")  # the export's own K, no num_loops
        if os.path.exists(default):
            row["default"] = json.load(open(default))["perplexity"]["loss"]
        for n in (1, 2, 3, 4):
            one = os.path.join(HERE, "depth", f"{label}-n{n}.json")
            txt = os.path.join(HERE, "depth", f"{label}-n{n}.txt")
            if os.path.exists(one):
                ppl = json.load(open(one))["perplexity"]  # without --num-loops (mor-threshold): the default K
                row[n] = ppl["depths"][0]["loss"] if ppl.get("depths") else ppl["loss"]
            elif os.path.exists(txt) and n not in row:
                refused = [line for line in open(txt) if line.startswith("refused:")]
                if refused:
                    row[n] = refused[-1].strip()
        if row:
            table[label] = row
    return table


def main() -> None:
    cs = curves()
    lines = ["# Fixed depth vs random recurrence vs MoR (one seed, 2-core CPU, this machine)", "",
             "Validation loss (the training log's: 6 held-out micro-batches of 16 x 128) at the end of each "
             "run; training FLOPs = tokens x model_summary.py's train FLOPs/token (expected for the "
             "random-recurrence arms).", "",
             "| arm | train FLOPs/token | tokens | training FLOPs | valid loss (mid-run) | valid loss (end) | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for a in ARMS:
        pts = cs[a]["points"]
        end, mid = pts[-1], pts[(len(pts) - 1) // 2]
        total = end["tokens"] * FLOPS[a]
        ex, n = executed_flops(a)
        summary[a] = {"flops_per_token": FLOPS[a], "tokens": end["tokens"], "train_flops": total,
                      "valid_loss_end": end["valid_loss"], "mid": mid, "seconds": cs[a]["seconds"],
                      "executed_flops_per_token_logged": ex, "logged_steps": n, "points": pts}
        lines.append(f"| {a} | {FLOPS[a]:,} | {end['tokens']:,} | {total:.3e} | {mid['valid_loss']:.4f} "
                     f"(at {mid['tokens']:,} tok) | {end['valid_loss']:.4f} | {cs[a]['seconds']:.0f} |")
    logged = [f"{a}: {summary[a]['executed_flops_per_token_logged']:,.0f} over {summary[a]['logged_steps']} logged 10-step windows"
              for a in ARMS if summary[a]["executed_flops_per_token_logged"]]
    if logged:
        lines += ["", "Executed train FLOPs/token recorded in the training logs (perf/flops_per_token, mean): "
                  + "; ".join(logged) + "."]
    table = depth_table()
    lines += ["", "## Depth sweep", "",
              "tools/eval_lm.py --num-loops on the export: mean token loss on 512 validation-split samples "
              "(65,536 predicted tokens; documents never trained on), trained K = 2.", "",
              "| model | N=1 | N=2 (=K) | N=3 | N=4 |", "|---|---:|---:|---:|---:|"]
    for label, row in table.items():
        cells = []
        for n in (1, 2, 3, 4):
            v = row.get(n)
            if n == 2 and not isinstance(v, float) and "default" in row:
                v = row["default"]  # K without num_loops (a model that refuses num_loops altogether)
            cells.append(f"{v:.4f}" if isinstance(v, float) else ("refused" if v else "-"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    refusals = {f"{label} N={n}": v for label, row in table.items() for n, v in row.items() if isinstance(v, str)}
    if refusals:
        lines += ["", "Refusals (the export's one line):", ""] + [f"- {k}: `{v[len('refused: '):]}`" for k, v in refusals.items()]
    md = "\n".join(lines) + "\n"
    open(os.path.join(HERE, "results.md"), "w").write(md)
    json.dump({"arms": summary, "depth_sweep": {k: {str(n): v for n, v in r.items()} for k, r in table.items()}},
              open(os.path.join(HERE, "results.json"), "w"), indent=1)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for a in ARMS:
        pts = [p for p in cs[a]["points"] if p["tokens"] > 0]
        ax.plot([p["tokens"] * FLOPS[a] for p in pts], [p["valid_loss"] for p in pts], marker="o", ms=3, label=a)
    ax.set_xlabel("training FLOPs (tokens x train FLOPs/token)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.set_title("docstrings, tiny 1+2R2+1, h 128, one seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "loss_vs_flops.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, row in table.items():
        ns = [n for n in (1, 2, 3, 4) if isinstance(row.get(n), float)]
        if not ns and "default" in row:  # MoR: only its K, the export's default
            row = {2: row["default"]}
            ns = [2]
        if ns:
            ax.plot(ns, [row[n] for n in ns], marker="x" if label == "mor-threshold" else "o",
                    ms=9 if label == "mor-threshold" else 6, label=label)
    ax.axvline(2, color="grey", lw=0.5, ls=":")
    ax.set_xticks([1, 2, 3, 4])
    ax.set_xlabel("inference depth N (loop iterations; trained K = 2)")
    ax.set_ylabel("validation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "depth_sweep.png"), dpi=120)
    os.makedirs(os.path.join(HERE, "logs"), exist_ok=True)
    for a in ARMS:
        src = os.path.join(RUN_DIRS[a], "log.jsonl")
        if os.path.exists(src):
            shutil.copy(src, os.path.join(HERE, "logs", f"{a}.jsonl"))
    print(md)


if __name__ == "__main__":
    main()
