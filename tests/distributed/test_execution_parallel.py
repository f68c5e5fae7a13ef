"""Attention backends, activation recompute and bf16 under tensor and pipeline parallelism."""

import os

import pytest
import torch

from launch import ROOT, run_workers
from test_training import step_losses

pytestmark = pytest.mark.distributed
WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")
SCRIPT = os.path.join(ROOT, "pretrain_mesh.py")
# 4 micro-batches per step (global 8 = micro 2 x grad-accum 4), dropout on so recompute must
# replay the same masks.
COMMON = ["--ds_config", "examples/zero1.json", "--train-iters", "3", "--micro-batch-size", "2",
          "--global-batch-size", "8", "--seq-length", "32", "--eval-interval", "0", "--log-interval", "1",
          "--sample-tokens", "0", "--lr", "1e-3", "--min-lr", "1e-4", "--variant", "mesh"]


def train(tmp_path, name, nprocs, extra):
    jsonl = tmp_path / f"{name}.jsonl"
    run_workers(SCRIPT, nprocs, COMMON + extra + ["--save", str(tmp_path / name), "--log-jsonl", str(jsonl)])
    return step_losses(jsonl)


def test_sdpa_equals_local_with_tp2(tmp_path):
    run_workers(WORKER, 1, ["mesh", str(tmp_path)])  # the full weights both TP=2 runs split
    for backend in ("local", "sdpa"):
        run_workers(WORKER, 2, ["mesh", str(tmp_path), backend])
    ref, got = (torch.load(tmp_path / f"result_mesh_{b}_tp2.pt") for b in ("local", "sdpa"))
    assert (got["logits"] - ref["logits"]).abs().max() <= 1e-5
    assert abs(got["loss"] - ref["loss"]) <= 1e-5
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert (got["grads"][name] - g).abs().max() <= 1e-5, name


@pytest.mark.parametrize("parallel", [["--tensor-model-parallel-size", "2"],
                                      ["--pipeline-model-parallel-size", "2", "--pipeline-split", "1,5"]],
                         ids=["tp2", "pp2"])
def test_recompute_loop_equals_none_in_training(tmp_path, parallel):
    # tiny is 1+2R2+1 (6 compute layers); the 1,5 split puts the prelude on stage 0 and the
    # looped core (with its MeSH buffer, fed by h_emb across the boundary) and coda on stage 1.
    extra = parallel + ["--attention-backend", "sdpa"]
    none = train(tmp_path, "none", 2, extra + ["--recompute", "none"])
    loop = train(tmp_path, "loop", 2, extra + ["--recompute", "loop"])
    assert len(none) == len(loop) == 3
    for a, b in zip(none, loop):
        assert abs(a - b) <= 1e-6 * abs(a), (none, loop)


@pytest.mark.parametrize("model,schedule", [
    ([], ["--pipeline-split", "1,5"]),
    # interleaved: 2 stages x 2 chunks = 4 pieces, so the 5-piece layout 2+2R2+2
    (["--layout", "2+2R2+2"], ["--virtual-pipeline-model-parallel-size", "2"]),
], ids=["1f1b", "interleaved"])
def test_bf16_pp2_close_to_pp1(tmp_path, model, schedule):
    extra = ["--bf16", "--train-iters", "5"] + model
    one = train(tmp_path, "bf16_pp1", 1, extra)
    two = train(tmp_path, "bf16_pp2", 2, extra + ["--pipeline-model-parallel-size", "2"] + schedule)
    assert len(one) == len(two) == 5
    # Step 1 runs the same bf16 forward on the same weights: the same loss.
    assert abs(one[0] - two[0]) <= 1e-6 * one[0], (one, two)
    # Afterwards the weights differ by how gradients were accumulated: DeepSpeed's bf16
    # engine accumulates each micro-batch's gradient into fp32, the pipeline schedule sums the
    # 4 micro-batches in the bf16 .grad first (rounding 2^-8 relative per add). Adam turns a
    # relative gradient difference of ~1e-2 into an update difference of ~1e-2 * lr per
    # weight, so the loss moves apart by about that share of its per-step change (~0.3):
    # 0.01 bounds five steps of it; a real error (a stage's gradient lost or doubled) moves
    # the loss by its whole step change.
    assert max(abs(a - b) for a, b in zip(one, two)) <= 0.01, (one, two)
    assert two[-1] < two[0] - 0.1  # and it trains (lr 1e-3 with warm-up: ~0.2 in 5 steps)
