"""Resharding keeps the whole training state: a run saved on one layout continues on another
(fewer TP ranks, fewer data-parallel ranks) with the losses of the run that never stopped."""

import json
import os

import pytest
import torch

from launch import ROOT, run_script
from test_training import assert_grad_norms_close, train

pytestmark = pytest.mark.distributed
CONVERT = os.path.join(ROOT, "tools", "convert_checkpoint.py")
# 10 steps, a checkpoint at 5; lr warmup ends at step 2, then cosine: the LR schedule position
# matters, and Adam's moments after 5 steps are far from a fresh start.
COMMON = ["--train-iters", "10", "--save-interval", "5", "--keep-last", "2", "--micro-batch-size", "4",
          "--global-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4", "--adam-eps", "1e-6"]
# Relaxed sharing (model/relaxation.py): a LoRA per loop iteration on the core's four linears,
# and per-iteration biases and LayerNorms. The TP and PP cases carry these tensors' Adam moments.
RELAXED = ["--lora-rank", "4", "--lora-alpha", "8", "--relax-biases", "--relax-norms"]


def tp_split_dim(name: str):
    """The dimension TP=2 splits a relaxation tensor along, from its layer's parallel style
    (relaxation.TARGET_SPECS), not from the parameter's partition_dim tag: column-parallel
    layers split lora_B [K, out, r] and bias_delta [K, out] by output rows (dim 1), row-parallel
    ones lora_A [K, r, in] by input columns (dim 2); the rest is replicated (None)."""
    from mesh_megatron.model.relaxation import TARGET_SPECS

    style = next((kind for _, attr, kind in TARGET_SPECS.values() if f".{attr}." in name), None)
    if style == "column" and name.endswith((".lora_B", ".bias_delta")):
        return 1
    if style == "row" and name.endswith(".lora_A"):
        return 2
    return None


def convert(src, dst, *flags):
    proc = run_script(CONVERT, ["--load", str(src), "--save", str(dst), "--iteration", "5", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def continue_from(tmp_path, name, converted, nprocs, extra, straight: str):
    """Steps 6..10 on the new layout; their losses, after checking that every step's gradient
    norm is the `straight` run's (a scale error in the carried state, e.g. Adam's moments,
    shows there first; clipping and Adam hide it from the losses)."""
    losses, _, out = train(tmp_path, name, nprocs, COMMON + extra + ["--load", str(converted)])
    assert "resumed from" in out[0] and "iteration 5, 40 samples consumed" in out[0], out[0][-2000:]
    assert_grad_norms_close(tmp_path / f"{straight}.jsonl", tmp_path / f"{name}.jsonl", ref_steps=slice(5, None))
    return losses


def test_tp2_resharded_to_tp1_continues_the_run(megatron_single, tmp_path):
    """With hidden dropout 0.1: its masks come from torch's default generator, seeded alike on
    every rank and drawn in the same order for any TP size, so TP=1 continues them only if the
    conversion carried the RNG state over. (Attention dropout draws from a stream per TP rank,
    which TP=1 cannot continue: it stays 0 here.) With per-loop adapters and relaxed biases
    and norms (RELAXED): their Adam moments must merge along each layer's own split."""
    from mesh_megatron.checkpoint.reader import open_checkpoint, read_model_state
    from mesh_megatron.checkpoint.reshard import _merge_data_parallel, optimizer_files, read_optimizer_state

    zero1 = ["--ds_config", "examples/zero1.json", "--hidden-dropout", "0.1"] + RELAXED
    straight, save, _ = train(tmp_path, "tp2", 2, COMMON + zero1 + ["--tensor-model-parallel-size", "2"])
    # The merge of the TP shards (optimizer side) is the merge of the weights (model side):
    # in fp32 training the master weights are the module weights.
    ckpt = open_checkpoint(str(save), 5)
    optim, step, _ = read_optimizer_state(ckpt)
    weights = read_model_state(ckpt)
    assert int(step) == 5 and optim.keys() == weights.keys()
    for name in weights:
        assert torch.equal(optim[name]["fp32"], weights[name]), name
        assert optim[name]["exp_avg_sq"].abs().sum() > 0, name
    # Each TP rank's own ZeRO file (its flat TP-local moments) is the slice of the merged
    # moment along the layer's split: B of a column-parallel layer by rows, A of a row-parallel
    # one by columns; replicated adapters (A of column, B of row, the norms' deltas) are rank 0's.
    local = [_merge_data_parallel(files)[0] for _, files in sorted(optimizer_files(ckpt).items())]
    relaxed = [n for n in weights if n.endswith((".lora_A", ".lora_B", "_delta"))]
    assert len(relaxed) == 2 * (4 * 3 + 2 * 2)  # 2 core layers x (4 linears x A, B, bias + 2 norms x 2)
    assert {tp_split_dim(n) for n in relaxed} == {1, 2, None}
    for name in relaxed:
        dim = tp_split_dim(name)
        for key in ("exp_avg", "exp_avg_sq"):
            full = optim[name][key]
            parts = full.chunk(2, dim) if dim is not None else (full, full)
            for tp in (0, 1) if dim is not None else (0,):
                assert torch.equal(parts[tp].flatten(), local[tp][name][key]), (name, key, tp)

    out = convert(save, tmp_path / "tp1_ckpt", "--tensor-model-parallel-size", "1")
    assert "optimizer, LR schedule, data position and RNG at iteration 5" in out
    for name in relaxed:  # the universal files record the split for a TP > 1 target's loader
        entry = torch.load(tmp_path / "tp1_ckpt" / "iter_0000005" / "zero" / name / "exp_avg.pt")
        assert torch.equal(entry["param"], optim[name]["exp_avg"]) and entry.get("cat_dim") == tp_split_dim(name), name
    resumed = continue_from(tmp_path, "tp1", tmp_path / "tp1_ckpt", 1, zero1, "tp2")
    assert len(straight) == 10 and len(resumed) == 5
    # TP=2 vs TP=1 differ by the order of floating-point sums: the TP tolerance.
    assert max(abs(a - b) for a, b in zip(straight[5:], resumed)) <= 1e-5, (straight[5:], resumed)

    # The same weights without the optimizer (Adam and LR schedule restarted) continue
    # differently: the comparison above can fail.
    convert(save, tmp_path / "weights_ckpt", "--tensor-model-parallel-size", "1", "--weights-only")
    fresh, _, _ = train(tmp_path, "fresh", 1, COMMON + zero1 + ["--train-iters", "5", "--load",
                                                                str(tmp_path / "weights_ckpt")])
    assert max(abs(a - b) for a, b in zip(straight[5:], fresh)) > 1e-3

    # A checkpoint without ZeRO optimizer shards (that weights-only one; likewise ZeRO-0 runs
    # and imports) is refused with one line pointing at --weights-only, nothing written.
    proc = run_script(CONVERT, ["--load", str(tmp_path / "weights_ckpt"), "--save", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "--weights-only" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_zero2_two_ranks_resharded_to_one_rank(tmp_path):
    """ZeRO-2 over 2 data-parallel ranks -> 1, with per-loop adapters (RELAXED): their moments
    are partitioned across the data-parallel ranks like any other parameter's."""
    zero2 = ["--ds_config", "examples/zero2.json"] + RELAXED
    straight, save, _ = train(tmp_path, "dp2", 2, COMMON + zero2)
    convert(save, tmp_path / "dp1_ckpt")
    resumed = continue_from(tmp_path, "dp1", tmp_path / "dp1_ckpt", 1, zero2, "dp2")
    assert max(abs(a - b) for a, b in zip(straight[5:], resumed)) <= 1e-5, (straight[5:], resumed)


def test_pp2_resharded_to_pp1_continues_the_run(tmp_path):
    """Pipeline stages merge with their optimizer: the 1,5 split puts the looped core (and the
    MeSH routers, fed h_emb across the boundary, and the core's per-loop adapters) on stage 1,
    prelude and embeddings on stage 0."""
    zero1 = ["--ds_config", "examples/zero1.json", "--variant", "mesh"] + RELAXED
    straight, save, _ = train(tmp_path, "pp2", 2, COMMON + zero1 + ["--pipeline-model-parallel-size", "2",
                                                                     "--pipeline-split", "1,5"])
    # The adapters' moments are in stage 1's ZeRO file, with the core they relax.
    from mesh_megatron.checkpoint.reader import open_checkpoint
    from mesh_megatron.checkpoint.reshard import _merge_data_parallel, optimizer_files

    files = sorted(optimizer_files(open_checkpoint(str(save), 5)).items())
    stages = [set(_merge_data_parallel(f)[0]) for _, f in files]
    relaxed = [{n for n in names if n.endswith((".lora_A", ".lora_B", "_delta"))} for names in stages]
    assert not relaxed[0] and len(relaxed[1]) == 32 and all(n.startswith("block.core.") for n in relaxed[1])
    out = convert(save, tmp_path / "pp1_ckpt", "--pipeline-model-parallel-size", "1")
    assert "optimizer, LR schedule, data position and RNG at iteration 5" in out
    recorded = json.load(open(tmp_path / "pp1_ckpt" / "iter_0000005" / "mesh_config.json"))["recipe"]["parallel"]
    assert (recorded["pipeline_model_parallel_size"], recorded["pipeline_split"]) == (1, None)
    resumed = continue_from(tmp_path, "pp1", tmp_path / "pp1_ckpt", 1, zero1, "pp2")
    assert len(straight) == 10 and len(resumed) == 5
    assert max(abs(a - b) for a, b in zip(straight[5:], resumed)) <= 1e-5, (straight[5:], resumed)
