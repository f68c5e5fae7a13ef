"""Pipeline parallelism on CPU (gloo): PP=2 (and TP=2 x PP=2) equal one process."""

import os

import pytest
import torch

from launch import ROOT, run_script, run_workers
from test_training import assert_grad_norms_close, logged, step_losses

pytestmark = pytest.mark.distributed
SCRIPT = os.path.join(ROOT, "pretrain_mesh.py")
# 4 micro-batches per step: global 8 = micro 2 x grad-accum 4 (one data-parallel rank).
COMMON = ["--ds_config", "examples/zero1.json", "--train-iters", "3", "--micro-batch-size", "2",
          "--global-batch-size", "8", "--seq-length", "32", "--eval-interval", "0", "--log-interval", "1",
          "--sample-tokens", "0", "--lr", "1e-3", "--min-lr", "1e-4"]


def run(tmp_path, name, nprocs, extra):
    save = tmp_path / name
    out = run_workers(SCRIPT, nprocs, COMMON + extra + ["--save", str(save), "--log-jsonl", str(tmp_path / f"{name}.jsonl")])
    return step_losses(tmp_path / f"{name}.jsonl"), save, out


def convert(src, dst, *flags):
    proc = run_script(os.path.join(ROOT, "tools", "convert_checkpoint.py"), ["--load", str(src), "--save", str(dst), *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]


def merged_params(save_dir, tp: int, pp: int, variant: str = "mesh", layout=None, **model) -> dict[str, torch.Tensor]:
    """Full weights from every (pp, tp) file: stages merge by name, TP shards concatenate
    along megatron's partition dim (read from a TP=1 meta model)."""
    from mesh_megatron.checkpoint.tensor_parallel import partition_dims
    from mesh_megatron.config import ParallelConfig, preset, to_transformer_config
    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.parallel.initialize import initialize_distributed

    tag = open(os.path.join(save_dir, "latest")).read().strip()
    shards: dict[str, list[torch.Tensor]] = {}
    for mp in range(tp * pp):
        state = torch.load(os.path.join(save_dir, tag, f"mp_rank_{mp:02d}_model_states.pt"), weights_only=False)
        for k, v in state["module"].items():
            if isinstance(v, torch.Tensor):
                shards.setdefault(k, []).append(v)
    initialize_distributed(ParallelConfig())
    cfg = preset("tiny", variant, layout, seq_length=32, **model)
    with torch.device("meta"):
        dims = partition_dims(MeshGPTModel(cfg, to_transformer_config(cfg, perform_initialization=False)))
    return {k: torch.cat(v, dim=dims[k]) if k in dims and len(v) > 1 else v[0] for k, v in shards.items()}


# Mixture-of-Recursions (model/mor.py): capacities 1, 0.5, auxiliary BCE and z-loss weighted so
# their gradients show in the norm. It stands in for `base` here: the same pipeline path (tiny's
# automatic split puts prelude and core on stage 0, only h crosses), and the auxiliary loss arises
# on stage 0, not the last, so it reaches backward only through MoEAuxLossAutoScaler.
MOR = ["--variant", "mor", "--mor-capacities", "1,0.5", "--mor-aux-weight", "0.1", "--mor-z-loss", "0.01"]
# token choice (model/mor_token.py): its balancing loss arises on stage 0 too, the same path
MOR_TC = ["--variant", "mor", "--mor-routing", "token-choice", "--mor-balance-weight", "0.1", "--mor-z-loss", "0.01"]
# Relaxed sharing (model/relaxation.py) rides on the mesh cases: per-loop LoRA on the core's
# linears and per-loop biases and norms, which live in the core's layers on the core's stage.
RELAXED = ["--lora-rank", "4", "--lora-alpha", "8", "--relax-biases", "--relax-norms"]
RELAXED_MODEL = dict(lora_rank=4, lora_alpha=8.0, relax_biases=True, relax_norms=True)


def is_relaxation(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B", "_delta"))


def stage_names(save_dir, mp: int) -> set[str]:
    tag = open(os.path.join(save_dir, "latest")).read().strip()
    state = torch.load(os.path.join(save_dir, tag, f"mp_rank_{mp:02d}_model_states.pt"), weights_only=False)
    return {k for k, v in state["module"].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("variant", ["vanilla", "mor", "mor-tc", "anchor_emb", "mesh"])
def test_pp2_equals_pp1(tmp_path, variant):
    """Losses, weights and the gradient norm of every step (clipping on: the losses alone
    cannot see a gradient scale, see assert_grad_norms_close). Measured on vanilla, gradients
    scaled before the reduction: every one x4 (a missing 1 / micro-batches) leaves the losses
    equal to every digit and logs norm 6.09 against 1.52; stage 1's alone x2 logs 2.03 (26%
    of the squared norm), stage 0's 2.73 (74%), where the losses move by only 6e-5 and 3e-5."""
    # anchor_emb and mesh read the embeddings inside the looped core. tiny's automatic split
    # keeps prelude and core on stage 0, where nothing of that crosses a boundary: put the core
    # on stage 1 (split 1,5 of 1+2R2+1) so stage 0 sends [h, h_emb] and the embedding's
    # gradient comes back through the pipeline.
    split = ["--pipeline-split", "1,5"] if variant in ("anchor_emb", "mesh") else []
    # anchor_emb trains with random recurrence and truncated backprop: stage 1 (the core's)
    # draws each micro-batch's count from (iteration, micro-batch) itself, as PP = 1 does; and
    # with Huginn's loop (model/injection.py): the core reads A [h_t; e], e the prelude's output
    # from stage 0, from a noise start drawn on stage 1, where the adapter lives.
    rec = ["--recurrence-sampling", "poisson-lognormal", "--mean-recurrence", "2", "--backprop-depth", "1",
           "--input-injection", "concat-adapter", "--state-init", "noise"] if variant == "anchor_emb" else []
    model = {"mor": MOR, "mor-tc": MOR_TC}.get(variant, ["--variant", variant] + (RELAXED if variant == "mesh" else []))
    one, save1, _ = run(tmp_path, "pp1", 1, model + rec)
    two, save2, out = run(tmp_path, "pp2", 2, model + ["--pipeline-model-parallel-size", "2"] + split + rec)
    assert "stage 1:" in out[0]
    assert ("sends [h, h_emb]" in out[0]) == bool(split)
    assert ("recurrence: poisson-lognormal R=2" in out[0]) == bool(rec)
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    assert_grad_norms_close(tmp_path / "pp1.jsonl", tmp_path / "pp2.jsonl")
    if variant.startswith("mor"):  # the auxiliary losses, logged from stage 0, are the one process's
        assert "core (" in next(line for line in out[0].splitlines() if "stage 0:" in line)
        for key in ("train/mor_bce" if variant == "mor" else "train/mor_balance", "train/mor_z_loss"):
            a, b = logged(tmp_path / "pp1.jsonl", key), logged(tmp_path / "pp2.jsonl", key)
            assert len(a) == 3 and a[0] > 0 and max(abs(x - y) / x for x, y in zip(a, b)) <= 1e-5, (key, a, b)
    if variant == "mor-tc":  # FLOPs count what each recursion ran on, measured on the core's stage and
        # reduced to every rank with the step's statistics: PP=2 logs PP=1's, not the uniform estimate
        f1, f2 = logged(tmp_path / "pp1.jsonl", "perf/flops_per_token"), logged(tmp_path / "pp2.jsonl", "perf/flops_per_token")
        assert len(f1) == 3 and max(abs(a - b) / a for a, b in zip(f1, f2)) <= 1e-12, (f1, f2)
        assert f"train FLOPs/token" in out[0] and " processed 1.000/" in out[0], out[0]
        estimate = int(next(line for line in out[0].splitlines() if "train FLOPs/token" in line)
                       .split(" train FLOPs/token")[0].rsplit(" ", 1)[1].replace(",", ""))
        assert len(set(f1)) > 1 and any(f != estimate for f in f1), (f1, estimate)  # as routed, step by step
    variant = variant.removesuffix("-tc")
    p1, p2 = merged_params(save1, 1, 1, variant), merged_params(save2, 1, 2, variant)
    assert p1.keys() == p2.keys()
    for k in p1:
        assert (p1[k] - p2[k]).abs().max() <= 1e-5, k
    if rec:  # the adapter is stage 1's alone, and it trained (off its [I, I] init)
        tag = open(os.path.join(save2, "latest")).read().strip()
        stages = [torch.load(os.path.join(save2, tag, f"mp_rank_{mp:02d}_model_states.pt"), weights_only=False)
                  ["module"] for mp in (0, 1)]
        adapter = "block.injection.adapter.weight"
        assert adapter not in stages[0] and adapter in stages[1]
        h = p2[adapter].shape[0]
        assert (p2[adapter] - torch.cat([torch.eye(h), torch.eye(h)], dim=1)).abs().max() > 1e-4
    if variant == "mesh":  # the adapters sit on stage 1 with the core, and B has trained
        assert not any(map(is_relaxation, stage_names(save2, 0)))
        assert sum(map(is_relaxation, stage_names(save2, 1))) == 32 == sum(map(is_relaxation, p1))
        assert all(p1[k].abs().sum() > 0 for k in p1 if k.endswith(".lora_B"))
        # The HF export's PP-specific part: the stages' union (reader) under the key map, with
        # the adapters as the PP=1 run's (the rest of export_to_hf is PP-blind; its HF parity
        # for adapters is test_export.py's; skipping it here saves importing transformers).
        from mesh_megatron.checkpoint.reader import open_checkpoint, read_model_state
        from mesh_megatron.conversion.key_map import training_to_hf

        ckpts = [open_checkpoint(str(save)) for save in (save1, save2)]
        hf = [training_to_hf(read_model_state(ckpt), ckpt.model) for ckpt in ckpts]
        assert hf[0].keys() == hf[1].keys() and sum(map(is_relaxation, hf[1])) == 32
        assert all((hf[0][k] - hf[1][k]).abs().max() <= 1e-5 for k in hf[0])


def test_embeddings_cross_the_boundary_only_where_needed(tmp_path):
    """anchor_emb with the core on stage 1: stage 0 sends [h, h_emb] ([s, b, 2h])."""
    _, _, out = run(tmp_path, "split", 2, ["--variant", "anchor_emb", "--pipeline-model-parallel-size", "2",
                                           "--pipeline-split", "1,5", "--train-iters", "1"])
    assert "stage 0:" in out[0] and "sends [h, h_emb]" in out[0]


def test_tp2_pp2_equals_single_process(tmp_path):
    """Losses, weights and every step's gradient norm: the norm is summed over the 4 shards
    (TP x PP) once each; a shard counted twice or a stage's gradient scaled moves it
    (assert_grad_norms_close), where clipping and Adam hide it from the losses."""
    # TP changes the order of floating-point sums. Where a gradient is ~0 (GELU units that
    # are off), Adam's update lr * g / (|g| + eps) turns 1e-10 of rounding into lr * 1e-10 / eps;
    # eps = 1e-6 keeps that below the tolerance without changing anything else.
    # With per-loop adapters (RELAXED): their TP halves on the core's stage (0 here) merge too.
    eps = ["--adam-eps", "1e-6"] + RELAXED
    one, save1, _ = run(tmp_path, "single", 1, ["--variant", "mesh"] + eps)
    four, save4, _ = run(tmp_path, "tp2pp2", 4, ["--variant", "mesh", "--pipeline-model-parallel-size", "2",
                                                 "--tensor-model-parallel-size", "2"] + eps)
    assert max(abs(a - b) for a, b in zip(one, four)) <= 1e-5, (one, four)
    assert_grad_norms_close(tmp_path / "single.jsonl", tmp_path / "tp2pp2.jsonl")
    p1, p4 = merged_params(save1, 1, 1, **RELAXED_MODEL), merged_params(save4, 2, 2, **RELAXED_MODEL)
    assert [sum(map(is_relaxation, stage_names(save4, mp))) for mp in range(4)] == [32, 32, 0, 0]
    assert p1.keys() == p4.keys()
    for k in p1:
        assert (p1[k] - p4[k]).abs().max() <= 1e-5, k


def test_save_pp2_load_pp1_refused_then_converted(tmp_path):
    """A PP=2 checkpoint under PP=1: refused with the conversion to run; converted, it loads
    and holds exactly the PP=2 run's weights."""
    from mesh_megatron.config import ConfigError
    from mesh_megatron.training import arguments

    _, save2, _ = run(tmp_path, "pp2", 2, ["--variant", "mesh", "--pipeline-model-parallel-size", "2",
                                           "--train-iters", "2"])
    # Sizes from the checkpoint's recorded recipe that one process cannot hold...
    with pytest.raises(ConfigError, match=r"saved with TP=1 PP=2 \(its recorded recipe\), which world size 1 "
                                          r"cannot hold: .*tools/convert_checkpoint.py"):
        arguments.parse(["--ds_config", "examples/zero1.json", "--seq-length", "32", "--load", str(save2)],
                        world_size=1)
    # ...and sizes asked for that differ from the saved ones.
    with pytest.raises(ConfigError, match=r"saved with TP=1 PP=2 .* this run uses TP=1 PP=1 .*tools/convert_checkpoint.py"):
        arguments.parse(["--ds_config", "examples/zero1.json", "--seq-length", "32", "--load", str(save2),
                         "--pipeline-model-parallel-size", "1"], world_size=1)
    converted = tmp_path / "pp1"
    convert(save2, converted, "--pipeline-model-parallel-size", "1", "--weights-only")
    before, after = merged_params(save2, 1, 2), merged_params(converted, 1, 1)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    out = run_workers(SCRIPT, 1, COMMON + ["--variant", "mesh", "--train-iters", "1", "--load", str(converted),
                                           "--save", str(tmp_path / "pp1_continued")])
    assert "weights only" in out[0]
    # ...and back: PP=1 weights into a PP=2 layout.
    back = tmp_path / "back"
    convert(converted, back, "--pipeline-model-parallel-size", "2", "--weights-only")
    again = merged_params(back, 1, 2)
    assert all(torch.equal(before[k], again[k]) for k in before)
    run_workers(SCRIPT, 2, COMMON + ["--variant", "mesh", "--train-iters", "1", "--pipeline-model-parallel-size", "2",
                                     "--load", str(back), "--save", str(tmp_path / "back_continued")])


@pytest.mark.parametrize("variant,layout", [("vanilla", "6"), ("mesh", "2+2R2+2")])
def test_interleaved_pp2_vp2_equals_pp1(tmp_path, variant, layout):
    """Interleaved 1F1B (2 model chunks per rank, 4 chunks): same losses, weights and
    gradient norm per step (the norm sees a scaled chunk's gradient where clipping and Adam
    hide it from the losses: assert_grad_norms_close)."""
    model = ["--variant", variant, "--layout", layout] + (RELAXED if variant == "mesh" else [])
    one, save1, _ = run(tmp_path, "pp1", 1, model)
    vp, save2, out = run(tmp_path, "vp", 2, model + ["--pipeline-model-parallel-size", "2",
                                                     "--virtual-pipeline-model-parallel-size", "2"])
    assert "interleaved" in out[0] and "stage 3:" in out[0]
    assert max(abs(a - b) for a, b in zip(one, vp)) <= 1e-5, (one, vp)
    assert_grad_norms_close(tmp_path / "pp1.jsonl", tmp_path / "vp.jsonl")
    p1, p2 = merged_params(save1, 1, 1, variant, layout), merged_params(save2, 1, 2, variant, layout)
    assert p1.keys() == p2.keys()
    for k in p1:
        assert (p1[k] - p2[k]).abs().max() <= 1e-5, k
    if variant == "mesh":  # the core (one chunk) carries its adapters: all on that chunk's rank
        assert sorted(sum(map(is_relaxation, stage_names(save2, mp))) for mp in (0, 1)) == [0, 32]
