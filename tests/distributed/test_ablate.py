"""tools/ablate.py --quick end to end through pretrain_mesh.py: the three outputs, numbers
equal to the runs' own validation logs, and a rerun that retrains nothing. The runs'
checkpoints record their recipe, and `--load` alone resolves to it."""

import json
import os
import subprocess
import sys

import pytest

from launch import ROOT

pytestmark = pytest.mark.distributed


def test_quick_ablation_writes_results_and_resumes(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "ablate.py"), "--quick", "--out", str(out),
           "--runs-dir", str(runs)]
    first = subprocess.run(cmd + ["--jobs", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
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

    # Resume: finished runs are not repeated (no new log lines, same results).
    logs = {v: (runs / f"{v}-s1234" / "log.jsonl").read_text() for v in ("base", "mesh")}
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, not repeated") == 2
    assert {v: (runs / f"{v}-s1234" / "log.jsonl").read_text() for v in ("base", "mesh")} == logs
    assert json.load(open(out / "results.json"))["records"] == results["records"]

    # The checkpoint recorded its resolved recipe; --load alone continues it.
    from mesh_megatron.training import arguments

    ckpt = runs / "mesh-s1234" / "ckpt"
    tag = open(ckpt / "latest").read().strip()
    recorded = json.load(open(ckpt / tag / "mesh_config.json"))["recipe"]
    assert recorded["model"]["variant"] == "mesh" and recorded["training"]["train_iters"] == 4
    resumed = arguments.parse(["--load", str(ckpt)], world_size=1)
    assert resumed.recipe == recorded and resumed.train.seed == 1234 and resumed.model.hidden_size == 32
