"""tools/ablate.py --quick end to end through pretrain_mesh.py: the three outputs, numbers
equal to the runs' own validation logs, a rerun that retrains nothing finished and continues
an interrupted run from its checkpoint to the same numbers under another --jobs. The runs'
checkpoints record their recipe, and `--load` alone resolves to it. (The report's 2-seed
logic on synthetic runs: tests/unit/test_ablate_summary.py.)"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from launch import ROOT

pytestmark = pytest.mark.distributed


def test_quick_ablation_writes_results_and_resumes(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "ablate.py"), "--quick", "--out", str(out),
           "--runs-dir", str(runs)]
    # One thread per run under any --jobs (--jobs 2 on its own would give each run cores / 2, --jobs 1
    # the default): another thread count reorders floating-point sums (1e-7 of a loss measured).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --keep-last 2 (for every run, after --): the step-2 checkpoint stays, for the interruption below.
    first = subprocess.run(cmd + ["--jobs", "2", "--", "--keep-last", "2"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert {"results.json", "results.md", "loss_vs_tokens.png", "recipe.yaml"} <= set(os.listdir(out))
    assert open(out / "loss_vs_tokens.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    results = json.load(open(out / "results.json"))
    # --quick: base and mesh, seed 1234, budgets 256 and 512 tokens at 4 x 32 = 128 tokens/step.
    assert results["tokens_per_step"] == 128 and results["budgets"] == {"256": 2, "512": 4}
    keys = sorted((r["variant"], r["seed"], r["tokens"]) for r in results["records"])
    assert keys == [("base", 1234, 256), ("base", 1234, 512), ("mesh", 1234, 256), ("mesh", 1234, 512)]
    for r in results["records"]:  # each number is the run's own logged validation loss
        logged = {json.loads(line)["step"]: json.loads(line)["valid/loss"]
                  for line in open(runs / f"{r['variant']}-s1234" / "log.jsonl") if "valid/loss" in line}
        assert r["valid_loss"] == logged[r["iteration"]]
    md = open(out / "results.md").read()
    assert "| tokens | base | mesh | mesh - base |" in md
    diff = {r["tokens"]: 0.0 for r in results["records"]}
    for r in results["records"]:
        diff[r["tokens"]] += r["valid_loss"] * (1 if r["variant"] == "mesh" else -1)
    assert f"| 512 | " in md and f"{diff[512]:+.4f}" in md
    crossover = next((t for t in sorted(diff) if diff[t] < 0), None)
    assert (f"mesh first beats base (mean over seeds) at {crossover:,} training tokens" if crossover
            else "not within the budgets run") in md

    # Rerun: the finished base run is not repeated (no new log lines); mesh is made an
    # interrupted run (killed during step 3: latest is the step-2 checkpoint, nothing logged
    # after step 2, no done.json) and continues from that checkpoint. Under --jobs 1 (the
    # first run had --jobs 2; one thread per run both times) the results are the same, exactly.
    base_log = (runs / "base-s1234" / "log.jsonl").read_text()
    mesh = runs / "mesh-s1234"
    os.remove(mesh / "done.json")
    shutil.rmtree(mesh / "ckpt" / "iter_0000004")
    (mesh / "ckpt" / "latest").write_text("iter_0000002")
    kept = [line for line in open(mesh / "log.jsonl") if json.loads(line)["step"] <= 2]
    (mesh / "log.jsonl").write_text("".join(kept))
    again = subprocess.run(cmd + ["--jobs", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, not repeated") == 1
    assert "mesh seed 1234: continuing from" in again.stdout
    assert "resumed from" in (mesh / "stdout.txt").read_text() and "iteration 2" in (mesh / "stdout.txt").read_text()
    assert (runs / "base-s1234" / "log.jsonl").read_text() == base_log
    rerun = json.load(open(out / "results.json"))
    assert rerun["records"] == results["records"]
    assert [c["points"] for c in rerun["curves"]] == [c["points"] for c in results["curves"]]

    # The checkpoint recorded its resolved recipe; --load alone continues it.
    from mesh_megatron.training import arguments

    ckpt = runs / "mesh-s1234" / "ckpt"
    tag = open(ckpt / "latest").read().strip()
    recorded = json.load(open(ckpt / tag / "mesh_config.json"))["recipe"]
    assert recorded["model"]["variant"] == "mesh" and recorded["training"]["train_iters"] == 4
    resumed = arguments.parse(["--load", str(ckpt)], world_size=1)
    assert resumed.recipe == recorded and resumed.train.seed == 1234 and resumed.model.hidden_size == 32
