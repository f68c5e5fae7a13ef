"""Relaxed sharing (model/relaxation.py): a LoRA, bias and LayerNorm delta per loop iteration.

Fresh adapters (B = 0, deltas 0) are the plain recursion exactly; random ones equal an
unrolled vanilla model whose layer t*C + c holds the merged W_c + s B_{t,c} A_{t,c}; recompute
reruns each iteration with its own adapters."""

import pytest
import torch

import tiny_models
from mesh_megatron.config import ADDITIVE_SUPPLEMENTS, ConfigError, ExecutionConfig, preset, validate
from mesh_megatron.parallel.initialize import set_seed

SEQ, BATCH = 16, 2
LOOPED = (*ADDITIVE_SUPPLEMENTS, "learned", "mesh", "mor")  # every variant with a shared core
RELAX = dict(lora_rank=4, relax_biases=True, relax_norms=True)


def build(variant, layout=None, execution=None, seed=11, **overrides):
    return tiny_models.build(variant, layout, execution, seed, SEQ, **overrides)


def tokens(seed=0):
    return tiny_models.tokens(seed, SEQ, BATCH)


@torch.no_grad()
def randomize_adapters(model, seed=3, scale=0.05):
    """Random B and deltas, different per iteration (A keeps its init)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith((".lora_B", "_delta")):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("variant", LOOPED)
def test_fresh_adapters_are_the_plain_recursion_exactly(megatron_single, variant):
    plain, relaxed = build(variant), build(variant, **RELAX)
    shared = dict(plain.named_parameters())
    extra = {n: p for n, p in relaxed.named_parameters() if n not in shared}
    # the shared weights are drawn identically (per-name init); the rest are the adapters
    for n, p in relaxed.named_parameters():
        if n in shared:
            assert torch.equal(p, shared[n]), n
    assert extra and all(n.endswith((".lora_A", ".lora_B", "_delta")) and n.startswith("block.core.")
                         for n in extra), sorted(extra)
    assert all(p.abs().sum() == 0 for n, p in extra.items() if not n.endswith(".lora_A"))
    assert all(p.abs().sum() > 0 for n, p in extra.items() if n.endswith(".lora_A"))
    inputs, labels = tokens()
    assert torch.equal(relaxed(inputs), plain(inputs))
    assert torch.equal(relaxed(inputs, labels=labels), plain(inputs, labels=labels))


@torch.no_grad()
def test_adapters_equal_unrolled_merged_weights(megatron_single):
    """base 1+2R3+1 with random per-iteration adapters == vanilla 8 layers whose layer
    P + t*C + c holds W_c + (alpha/r) B_{t,c} A_{t,c}, b_c + db_{t,c}, LN_c + d LN_{t,c}."""
    P, C, K = 1, 2, 3
    layout = f"{P}+{C}R{K}+1"
    relaxed = build("base", layout, lora_alpha=8.0, **RELAX)
    randomize_adapters(relaxed)
    flat = build("vanilla", layout)
    params = dict(relaxed.named_parameters())
    scale = relaxed.model_config.lora_scale
    assert scale == 2.0
    flat_params = dict(flat.named_parameters())
    for name, p in flat_params.items():
        if not name.startswith("block.prelude."):
            p.copy_(params[name])
            continue
        i, rest = name[len("block.prelude."):].split(".", 1)
        i = int(i)
        if i < P:
            p.copy_(params[name])
        elif i >= P + C * K:
            p.copy_(params[f"block.coda.{i - P - C * K}.{rest}"])
        else:
            t, c = divmod(i - P, C)
            module, leaf = rest.rsplit(".", 1)
            base = f"block.core.{c}.{module}"
            value = params[f"{base}.{leaf}"].clone()
            if leaf == "weight" and f"{base}.lora_A" in params:
                value += scale * params[f"{base}.lora_B"][t] @ params[f"{base}.lora_A"][t]
            elif f"{base}.{leaf}_delta" in params:
                value += params[f"{base}.{leaf}_delta"][t]
            p.copy_(value)
    inputs, _ = tokens()
    got, want = relaxed(inputs), flat(inputs)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # and the adapters matter: the same model with fresh B and deltas is far away
    plain = build("base", layout)
    assert (plain(inputs) - want).abs().max() > 1e-2 * want.abs().max()


def run(model, seed=5):
    return tiny_models.train_step(model, *tokens(), seed)


@pytest.mark.parametrize("variant", ["base", "mesh"])
@pytest.mark.parametrize("recompute", ["loop", "layer"])
def test_recompute_uses_each_iterations_own_adapters(megatron_single, variant, recompute):
    models = []
    for mode in ("none", recompute):
        m = build(variant, execution=ExecutionConfig(recompute=mode), **RELAX)
        randomize_adapters(m)
        models.append(m)
    ref, got = run(models[0]), run(models[1])
    assert models[1].block.recomputed == (4 if recompute == "loop" else 6)
    assert abs(got[0] - ref[0]) <= 1e-6 * abs(ref[0])
    scale = max(g.abs().max() for g in ref[1].values())
    for name in ref[1]:
        assert (got[1][name] - ref[1][name]).abs().max() <= 1e-6 * scale, name
    # the adapters of both iterations got their own (different, nonzero) gradients
    g = ref[1]["block.core.0.self_attention.linear_qkv.lora_B"]
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0 and not torch.allclose(g[0], g[1])


def test_relaxation_flags_are_checked(megatron_single):
    with pytest.raises(ConfigError, match="shared looped core"):
        validate(preset("tiny", "vanilla+mesh", lora_rank=4))
    with pytest.raises(ConfigError, match="above full rank 64"):
        validate(preset("tiny", "base", lora_rank=65))
    with pytest.raises(ConfigError, match="needs --lora-rank"):
        validate(preset("tiny", "base", lora_alpha=16.0))
    with pytest.raises(ConfigError, match="lora target 'attn' is unknown"):
        preset("tiny", "base", lora_rank=4, lora_targets="attn")
    full = preset("tiny", "base", lora_rank="full")
    assert (full.lora_rank, full.relax_biases, full.relax_norms) == (64, True, True)
    # training names are aliases of the Pythia ones, kept in layer order
    assert preset("tiny", "base", lora_targets="linear_fc2,dense").lora_targets == "dense,dense_4h_to_h"


def test_targets_pick_the_wrapped_linears(megatron_single):
    m = build("base", lora_rank=2, lora_targets="dense")
    names = [n for n, _ in m.named_parameters() if "lora" in n or "delta" in n]
    assert names == [f"block.core.{c}.self_attention.linear_proj.lora_{x}" for c in (0, 1) for x in "AB"]


def test_bf16_adapters_stay_bf16_and_fresh_ones_are_exact(megatron_single):
    """A bf16 model (DeepSpeed's --bf16 casts the module): fresh adapters still add exact
    zeros, so it is the bf16 plain recursion to the bit; random ones compute in bf16 (no
    upcast of the core's activations) and every adapter and delta gets a finite, nonzero bf16
    gradient in each iteration."""
    plain, relaxed = build("mesh").to(torch.bfloat16), build("mesh", **RELAX).to(torch.bfloat16)
    inputs, labels = tokens()
    with torch.no_grad():
        assert torch.equal(relaxed(inputs), plain(inputs))
    randomize_adapters(relaxed)
    seen = []
    for name, module in relaxed.named_modules():
        if hasattr(module, "relaxation"):
            module.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).dtype))
    relaxed(inputs, labels=labels).float().mean().backward()
    assert len(seen) == 2 * 2 * 6 and set(seen) == {torch.bfloat16}  # K x C x (4 linears + 2 norms)
    for name, p in relaxed.named_parameters():
        if name.endswith((".lora_A", ".lora_B", "_delta")):
            assert p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name
            assert all(p.grad[t].abs().sum() > 0 for t in range(2)), name


def test_bf16_zero1_training_with_adapters_reshards_and_resumes_exactly(megatron_single, tmp_path):
    """bf16 training with per-loop adapters (DeepSpeed's BF16_Optimizer at ZeRO-1, the
    recipes'): 2 steps, saved, resharded by tools/convert_checkpoint.py (its
    `bf16_zero_pp_rank_*` files), resumed in a fresh trainer: steps 3 and 4 are the straight
    run's, loss and gradient norm; the adapters trained as bf16 module weights."""
    import os
    import sys

    import deepspeed

    from mesh_megatron.checkpoint.manager import CheckpointManager, lineage
    from mesh_megatron.parallel.initialize import backend
    from mesh_megatron.training import arguments
    from mesh_megatron.training.trainer import Trainer
    from test_train_loop import ROOT, batches

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_checkpoint

    def trainer(save):
        run = arguments.parse(["--ds_config", os.path.join(ROOT, "examples/zero1.json"), "--bf16", "--seq-length", "8",
                               "--micro-batch-size", "1", "--global-batch-size", "2", "--sample-tokens", "0",
                               "--variant", "base", "--lora-rank", "4", "--relax-biases", "--relax-norms",
                               "--save", str(save)], world_size=1)
        deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
        set_seed(run.train.seed)
        return Trainer(run, (None, None), None), run

    straight, run = trainer(tmp_path / "ckpt")
    resumed = None
    try:
        for seed in (0, 1):
            straight.train_step(batches(run, 2, seed))
        save = str(tmp_path / "ckpt")
        straight._save(CheckpointManager(save, 2, run.parallel, *arguments.tokenizer_source(run.data),
                                         run_id=lineage(save, None)))
        assert os.path.exists(os.path.join(save, "iter_0000002", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        assert convert_checkpoint.main(["--load", save, "--save", str(tmp_path / "universal")]) == 0
        resumed, _ = trainer(tmp_path / "unused")
        resumed.resume(str(tmp_path / "universal"), "iter_0000002")
        adapters = {n: p for n, p in resumed.engine.module.named_parameters() if n.endswith((".lora_B", "_delta"))}
        assert len(adapters) == 2 * (4 * 2 + 2 * 2)  # 2 core layers x (4 linears x B, bias + 2 norms x 2)
        assert all(p.dtype == torch.bfloat16 and p.abs().sum() > 0 for p in adapters.values())
        # Step 3's loss and norm see the weights; step 4's see step 3's update, i.e. the carried
        # fp32 masters and Adam moments.
        for seed in (2, 3):
            loss_a, _ = straight.train_step(batches(run, 2, seed))
            loss_b, _ = resumed.train_step(batches(run, 2, seed))
            assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=0), seed
            assert float(resumed.engine.get_global_grad_norm()) == \
                pytest.approx(float(straight.engine.get_global_grad_norm()), rel=1e-6, abs=0), seed
    finally:
        straight.engine.destroy()
        if resumed is not None:
            resumed.engine.destroy()
