"""Random recurrence and truncated backprop (model/recurrence.py): the default is today's run,
draws are a pure function of (seed, iteration, micro-batch), the distribution is Huginn's, the
no_grad prefix gives no gradient and keeps no activations."""

import os

import numpy as np
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from mesh_megatron.config import (ConfigError, RecurrenceConfig, preset, to_transformer_config, validate,
                                  validate_recurrence)
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.model.recurrence import LoopPlan, draw_iterations, expected_iterations, loop_plan
from mesh_megatron.parallel.initialize import set_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, BATCH = 16, 2


def build(variant, layout=None, recurrence=None, **overrides):
    cfg = preset("tiny", variant, layout, seq_length=SEQ, **overrides)
    validate(cfg)
    if recurrence is not None:
        validate_recurrence(cfg, recurrence)
    return MeshGPTModel(cfg, to_transformer_config(cfg), recurrence=recurrence, init_seed=0)


def batch(seed=0):
    tokens = torch.randint(0, 4096, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


# Recorded at acc9fb6 (before recurrence existed): 3 steps of the embedded default (tiny mesh,
# fp32, ZeRO-2, seq 16, micro 2 x accum 2) on fixed random batches: (loss, grad norm) per step.
TODAY = [(8.464128971099854, 2.31320858001709), (8.587172508239746, 2.2737627029418945),
         (8.6205415725708, 2.2165937423706055)]


def _trainer(tmp_path, extra, ds="examples/zero2.json"):
    """A trainer of micro-batch 2 x accumulation 2 at seq 16 (no data: steps get their batches)."""
    import deepspeed

    from mesh_megatron.parallel.initialize import backend
    from mesh_megatron.training import arguments
    from mesh_megatron.training.trainer import Trainer

    run = arguments.parse(["--ds_config", os.path.join(ROOT, ds), "--seq-length", "16",
                           "--micro-batch-size", "2", "--global-batch-size", "4", "--sample-tokens", "0",
                           "--save", str(tmp_path / "unused")] + extra, world_size=1)
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
    set_seed(run.train.seed)
    return Trainer(run, (None, None), None), run


def _step_batches(run, g):
    steps = []
    for _ in range(2):
        t = torch.randint(0, run.model.vocab_size, (2, 17), generator=g)
        steps.append((t[:, :-1], t[:, 1:], torch.ones(2, 16)))
    return steps


def _three_steps(tmp_path, extra, ds="examples/zero2.json", weights=None):
    """(loss, grad norm) of 3 trainer steps; `weights`: a dict given the final parameters."""
    trainer, run = _trainer(tmp_path, extra, ds)
    g = torch.Generator().manual_seed(0)
    out = []
    try:
        for _ in range(3):
            loss, _ = trainer.train_step(_step_batches(run, g))
            norm = trainer.engine.get_global_grad_norm()  # None under ZeRO-0 (torch's optimizer)
            out.append((loss, None if norm is None else float(norm)))
        if weights is not None:
            weights.update({n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()})
    finally:
        trainer.engine.destroy()
    return out


def test_fixed_sampling_reproduces_todays_first_steps(megatron_single, tmp_path):
    """The default (`--recurrence-sampling fixed`, every iteration with gradient) gives the
    losses and gradient norms recorded before recurrence existed, to every digit. Red check:
    running fixed's first iteration under no_grad keeps the first loss (the forward is the
    same) but logs norm 1.944 for 2.313 and a second loss of 8.587142 for 8.587173."""
    assert _three_steps(tmp_path, []) == TODAY


def test_random_recurrence_under_zero2_equals_zero0(megatron_single, tmp_path):
    """base, R = 2, k = 1, the trainer's real steps: seed 1234 draws n = (1, 3), (2, 3), (4, 2) per
    micro-batch, so in step 3 no micro-batch backpropagates to the embedding and prelude (they
    get no gradient at all: None, not zeros). ZeRO-2 (bucketed, overlapped reduction) gives
    ZeRO-0's losses and final weights (assert_params_close: 1e-5, as the 2-rank ZeRO
    equivalences, the attention key bias off the rotary dims, whose true gradient is 0, within
    steps x lr). Red check: the ZeRO-2 run at --backprop-depth 2 (the prefix's parameters do
    get a gradient) puts its losses 2.2e-3 off ZeRO-0's."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
    from test_training import assert_params_close

    from mesh_megatron.model.recurrence import draw_iterations

    assert [[draw_iterations(2.0, 1234, it, m) for m in range(2)] for it in range(3)] == [[1, 3], [2, 3], [4, 2]]
    flags = ["--variant", "base", "--recurrence-sampling", "poisson-lognormal", "--mean-recurrence", "2",
             "--backprop-depth", "1", "--lr", "1e-3", "--seed", "1234"]
    w0, w2 = {}, {}
    zero0 = _three_steps(tmp_path, flags, "examples/zero0.json", w0)
    zero2 = _three_steps(tmp_path, flags, "examples/zero2.json", w2)
    assert max(abs(a[0] - b[0]) for a, b in zip(zero0, zero2)) <= 1e-5, (zero0, zero2)
    assert_params_close(w0, w2, heads=4, rotary_dims=4, lr=1e-3, steps=3)


def test_resume_draws_and_noise_what_the_straight_run_would_have(megatron_single, tmp_path):
    """base with Huginn's loop (concat adapter, noise start: torch's generator) under random
    recurrence (R = 2, k = 1), saved after 2 steps and resumed into a fresh trainer: its step 3
    draws n = (4, 2) from the restored iteration (not iteration 0's (1, 3)) and the noise from the
    restored generator, so loss and gradient norm are the straight run's step 3, bit for bit.
    Red checks: the resumed trainer at iteration 0 draws (1, 3) and logs another loss; without
    the restored RNG state (Trainer.resume's _set_rng_state skipped) the noise differs and so
    does the loss. (Both trainers share this process's generators: the straight run's step 3
    runs from the generator states it had at the save, as its own process would.)"""
    from mesh_megatron.checkpoint.manager import CheckpointManager, lineage
    from mesh_megatron.training.arguments import tokenizer_source
    from mesh_megatron.training.trainer import _rng_state, _set_rng_state

    flags = ["--variant", "base", "--input-injection", "concat-adapter", "--state-init", "noise",
             "--recurrence-sampling", "poisson-lognormal", "--mean-recurrence", "2", "--backprop-depth", "1",
             "--seed", "1234"]
    straight, run = _trainer(tmp_path / "a", flags)
    resumed = None
    try:
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            straight.train_step(_step_batches(run, g))
        save = str(tmp_path / "ckpt")
        straight._save(CheckpointManager(save, 2, run.parallel, *tokenizer_source(run.data),
                                         run_id=lineage(save, None)))
        at_save = _rng_state()
        resumed, _ = _trainer(tmp_path / "b", flags)  # its build draws from the generators
        resumed.resume(save, "iter_0000002")
        assert resumed.iteration == 2
        last = _step_batches(run, g)
        got = [resumed.train_step(last)[0]]
        norms = [float(resumed.engine.get_global_grad_norm())]
        _set_rng_state(at_save)
        got.append(straight.train_step(last)[0])
        norms.append(float(straight.engine.get_global_grad_norm()))
        assert got[0] == got[1] and norms[0] == norms[1], (got, norms)
    finally:
        straight.engine.destroy()
        if resumed is not None:
            resumed.engine.destroy()


def test_fixed_with_backprop_depth_k_is_the_plain_model(megatron_single):
    """--recurrence-sampling fixed --backprop-depth K (K = all) and a model built without any
    recurrence: the same loss and gradients bit for bit."""
    inputs, labels = batch(3)
    results = []
    for rec in (None, RecurrenceConfig("fixed", backprop_depth=2), RecurrenceConfig("fixed", backprop_depth=5)):
        model = build("mesh", recurrence=rec)
        model.train()
        loss = model(inputs, labels=labels, recurrence_key=(4, 1)).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(g, results[0][1][n]) for n, g in grads.items())


def test_draws_are_a_pure_function_of_seed_iteration_and_micro_batch():
    """What makes every TP/PP/DP rank and a resumed run draw the same: the draw reads nothing
    but its arguments (torch's and numpy's global generators moved in between change nothing),
    and the values are these (a fresh process, another rank, draws the same: pinned)."""
    first = [[draw_iterations(3.0, 1234, it, m) for m in range(4)] for it in range(4)]
    torch.manual_seed(99)
    np.random.seed(99)
    torch.rand(10)
    np.random.rand(10)
    assert [[draw_iterations(3.0, 1234, it, m) for m in range(4)] for it in range(4)] == first
    assert first == [[3, 3, 6, 2], [2, 4, 6, 3], [4, 3, 3, 4], [3, 4, 4, 6]]
    assert draw_iterations(3.0, 1235, 0, 0) != 3 or draw_iterations(3.0, 1235, 0, 1) != 3  # the seed matters
    rec = RecurrenceConfig("poisson-lognormal", 3.0, 2, seed=1234)
    assert loop_plan(rec, 2, (0, 2), training=True) == LoopPlan(6, 4)  # n = 6: 4 no_grad, 2 with grad
    assert loop_plan(rec, 2, (0, 3), training=True) == LoopPlan(2, 0)
    assert loop_plan(rec, 2, (0, 2), training=False) == LoopPlan(2, 0)  # evaluation: K
    assert loop_plan(None, 2, None, training=True) == LoopPlan(2, 0)
    with pytest.raises(ValueError, match="recurrence_key"):
        loop_plan(rec, 2, None, training=True)


def test_mean_of_10000_draws_is_the_distributions():
    """E[n] = R + 1 (Poisson(rate) + 1 with E[rate] = R); Var[n] = R + R^2 (e^{sigma^2} - 1).
    The sample mean is within 4 standard errors; E[min(n, k)] of expected_iterations (the
    FLOPs count) matches the sample too. Red check: dropping the + 1 puts the mean 34
    standard errors off."""
    R, sigma = 4.0, 0.5
    draws = np.array([draw_iterations(R, 7, i // 100, i % 100) for i in range(10_000)])
    se = np.sqrt((R + R ** 2 * (np.exp(sigma ** 2) - 1)) / len(draws))
    assert abs(draws.mean() - (R + 1)) <= 4 * se, (draws.mean(), se)
    assert draws.min() >= 1
    rec = RecurrenceConfig("poisson-lognormal", R, 3)
    n, with_grad = expected_iterations(rec, 2)
    assert n == R + 1
    clipped = np.minimum(draws, 3)
    assert abs(clipped.mean() - with_grad) <= 4 * clipped.std() / np.sqrt(len(draws)), (clipped.mean(), with_grad)
    assert expected_iterations(RecurrenceConfig(), 2) == (2.0, 2.0)
    assert expected_iterations(RecurrenceConfig(backprop_depth=1), 3) == (3.0, 1.0)


def _detached_prefix_loss(model, inputs, labels, n, no_grad):
    """Hand-built forward of the additive model: n iterations, the state detached after the
    first `no_grad` of them (what truncated backprop must equal)."""
    from megatron.core import tensor_parallel

    block = model.block
    h_emb = model.embed(inputs)
    rot = model.rotary_pos_emb(inputs.shape[1])
    h = block._layers(block.prelude.values(), h_emb, rot, None)
    h, carry = block.state_passing.start(h_emb, h)
    for t in range(n):
        if t == no_grad:
            h = h.detach()  # the carry (h0, h_emb) was built before the loop, with gradient
        y = block._layers(block.core_block(t), h, rot, None)
        h, carry = block.state_passing.step(t, h, y, carry)
    h = block._layers(block.coda.values(), h, rot, None)
    logits, _ = model.output_layer(model.final_layernorm(h))
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
    return loss.transpose(0, 1).contiguous().mean()  # [b, s], as the model returns it


@pytest.mark.parametrize("variant", ["base", "anchor"])
def test_truncated_backprop_equals_a_detached_prefix(megatron_single, variant):
    """A drawn n = 6 with k = 2: the loss and every gradient equal the hand-built model whose
    state is detached after iteration 4, bit for bit. `base` reads nothing but the state, so
    embedding and prelude (used only before the loop) get no gradient at all; `anchor` adds
    h0 = prelude output to every step, so its prelude still learns through the last k steps'
    anchors (the carry is built before the loop, with gradient). Red check: running
    every iteration with gradient gives the embedding a gradient and differs at 1e-3."""
    rec = RecurrenceConfig("poisson-lognormal", 3.0, 2, seed=1234)
    model = build(variant, recurrence=rec)
    model.train()
    inputs, labels = batch(1)
    plan = loop_plan(rec, 2, (0, 2), training=True)
    assert plan == LoopPlan(6, 4)
    loss = model(inputs, labels=labels, recurrence_key=(0, 2)).mean()
    loss.backward()
    got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = _detached_prefix_loss(model, inputs, labels, plan.iterations, plan.no_grad)
    ref.backward()
    assert loss.item() == ref.item()
    for name, p in model.named_parameters():
        if p.grad is None:
            assert got[name] is None or not got[name].any(), name
        else:
            assert got[name] is not None and torch.equal(got[name], p.grad), name
    emb = got["embedding.word_embeddings.weight"]
    if variant == "base":
        assert emb is None or not emb.any()  # used only in the no_grad prefix's input
        assert all(got[n] is None for n in got if n.startswith("block.prelude."))
    else:
        assert emb is not None and emb.abs().sum() > 0


@pytest.mark.parametrize("recompute,reruns", [("loop", 3), ("layer", 5)])
def test_truncated_backprop_under_recompute(megatron_single, recompute, reruns):
    """--recompute loop / layer with a drawn n = 6, k = 2: the no_grad prefix is not checkpointed
    (nothing to rerun), the last k iterations and the coda are (loop: as 2 + 1 blocks; layer:
    2 x 2 core layers + 1 coda layer; the prelude's output feeds only the prefix in `base`, so
    its backward never runs), and loss and gradients equal recompute none's. Red (found this
    way): megatron's checkpoint is an autograd.Function, so with the detached state as its only
    tensor input its output needed no grad and core and coda got no gradient at all (0
    reruns); recursive_block._run now makes such a state require grad (without it `layer`
    fails the same way: checked)."""
    from mesh_megatron.config import ExecutionConfig

    rec = RecurrenceConfig("poisson-lognormal", 3.0, 2, seed=1234)
    cfg = preset("tiny", "base", seq_length=SEQ)
    inputs, labels = batch(4)
    out = []
    for mode in ("none", recompute):
        model = MeshGPTModel(cfg, to_transformer_config(cfg), execution=ExecutionConfig("sdpa", mode),
                             recurrence=rec, init_seed=0)
        model.train()
        loss = model(inputs, labels=labels, recurrence_key=(0, 2)).mean()
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model.block.recomputed))
    (l0, g0, r0), (l1, g1, r1) = out
    assert (r0, r1) == (0, reruns)  # the 2 iterations with gradient, coda
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all((g0[n] is None) == (g1[n] is None) for n in g0)
    assert all(torch.equal(g0[n], g1[n]) for n in g0 if g0[n] is not None)


def _saved_bytes(model, inputs, labels, key=None) -> int:
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(inputs, labels=labels, recurrence_key=key).mean()
    return saved[0]


def test_saved_activations_grow_with_k_not_n(megatron_single):
    """Bytes saved for backward (every tensor autograd packs, counted by
    saved_tensors_hooks) depend on the k iterations with gradient only: K = 8 and K = 4 with
    k = 2 save the same bytes; k = 4 saves 2 more iterations' worth. Red check: without the
    no_grad prefix K = 8 saves 6 more iterations than K = 4 under k = 2."""
    inputs, labels = batch(2)

    def saved(layout, k):
        model = build("base", layout, recurrence=RecurrenceConfig(backprop_depth=k))
        model.train()
        return _saved_bytes(model, inputs, labels)

    k2_n8, k2_n4, k4_n8 = saved("1+1R8+1", 2), saved("1+1R4+1", 2), saved("1+1R8+1", 4)
    full_n8 = saved("1+1R8+1", 8)
    per_iteration = (k4_n8 - k2_n8) // 2
    assert per_iteration > 0
    assert k2_n8 == k2_n4
    assert full_n8 == k2_n8 + 6 * per_iteration


@pytest.mark.parametrize("variant,rec,needle", [
    ("base", RecurrenceConfig(mean_recurrence=3.0), "--mean-recurrence is set but --recurrence-sampling is 'fixed'"),
    ("base", RecurrenceConfig("poisson-lognormal"), "needs --mean-recurrence R > 0"),
    ("base", RecurrenceConfig("poisson-lognormal", 0.0), "needs --mean-recurrence R > 0"),
    ("base", RecurrenceConfig(backprop_depth=0), "--backprop-depth 0 must be >= 1"),
    ("base", RecurrenceConfig("uniform", 2.0), "--recurrence-sampling 'uniform' is unknown"),
    ("vanilla", RecurrenceConfig(backprop_depth=1), "need a looped model"),
    ("vanilla+mesh", RecurrenceConfig("poisson-lognormal", 2.0), "needs a shared core"),
    ("learned", RecurrenceConfig("poisson-lognormal", 2.0), "scalars for exactly K steps"),
    ("mesh", RecurrenceConfig("poisson-lognormal", 2.0), "needs --mesh-routers shared"),
    ("base+lora", RecurrenceConfig("poisson-lognormal", 2.0), "adapters exist for exactly K loop positions"),
    ("mor", RecurrenceConfig("poisson-lognormal", 2.0), "with variant 'mor': its routers and --mor-capacities"),
    ("mor", RecurrenceConfig(backprop_depth=1), "with variant 'mor': its routers and --mor-capacities"),
])
def test_recurrence_refusals(variant, rec, needle):
    variant, lora, _ = variant.partition("+lora")
    cfg = preset("tiny", variant, **({"lora_rank": 4} if lora else {}))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        validate_recurrence(cfg, rec)


# ---------------------------------------------------------------- FLOPs of executed iterations
@pytest.mark.parametrize("variant", ["vanilla", "base", "mesh", "vanilla+mesh", "mor", "base+lora", "mor+lora"])
def test_flops_at_k_are_the_fixed_count(variant):
    from mesh_megatron.model.accounting import flops_per_token, training_flops_per_token

    variant, lora, _ = variant.partition("+lora")
    cfg = preset("tiny", variant, **({"lora_rank": 4, "mor_capacities": "1,0.5"} if lora and variant == "mor"
                                     else {"lora_rank": 4} if lora else {}))
    assert flops_per_token(cfg) == training_flops_per_token(cfg)
    assert flops_per_token(cfg, 256, 2) == training_flops_per_token(cfg, 256, 2)
    assert flops_per_token(cfg, iterations=2.0, with_grad=2.0) == training_flops_per_token(cfg)
    if variant == "mor":  # its effective depths hold at exactly K: any other (n, g) is refused
        with pytest.raises(ValueError, match="runs exactly K=2 iterations"):
            flops_per_token(cfg, iterations=3, with_grad=1)


def test_flops_count_forward_of_n_and_backward_of_g():
    """tiny base (h 64, seq 128, 1+2R2+1, padded vocab 4096) running n = 5 iterations with the
    last g = 2 backpropagated: a forward over P + Q + C n = 12 layers, a backward (twice the
    forward's cost) over 2 + 2 g = 6, the output layer in both; and the expectation of a
    random recurrence is the count at (E[n], E[g])."""
    from mesh_megatron.model.accounting import expected_flops_per_token, flops_per_token

    cfg = preset("tiny", "base")
    h, s, v = 64, 128, 4096

    def forward(layers):
        return 2 * (layers * 12 * h * h + h * v) + 4 * layers * h * s

    assert flops_per_token(cfg, iterations=5, with_grad=2) == forward(12) + 2 * forward(6)
    rec = RecurrenceConfig("poisson-lognormal", 3.0, 2)
    n, g = expected_iterations(rec, 2)
    assert expected_flops_per_token(cfg, rec) == pytest.approx(forward(2 + 2 * n) + 2 * forward(2 + 2 * g), rel=1e-12)
    mesh = preset("tiny", "mesh")  # routers: (n + 1) steps forward, (g + 1) backward, 2 h B each
    router = 2 * h * mesh.slots
    assert flops_per_token(mesh, iterations=5, with_grad=2) == forward(12) + 2 * forward(6) + 2 * 6 * router + 4 * 3 * router


def test_model_summary_per_mean_recurrence(megatron_single, capsys):
    import json
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import model_summary
    from mesh_megatron.model.accounting import expected_flops_per_token

    assert model_summary.main(["--variant", "base", "--mean-recurrence", "1,3", "--backprop-depth", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["flops_per_token_by_mean_recurrence"]
    cfg = preset("tiny", "base")
    for r in ("1", "3"):
        rec = RecurrenceConfig("poisson-lognormal", float(r), 2)
        assert got[r]["expected_iterations"] == float(r) + 1
        assert got[r]["flops_per_token"] == expected_flops_per_token(cfg, rec)
    assert got["1"]["flops_per_token"] < got["3"]["flops_per_token"]
    assert model_summary.main(["--variant", "base", "--mean-recurrence", "1,3"]) == 0
    assert "at mean recurrence R=3 (E[n] 4.00" in capsys.readouterr().out
    assert model_summary.main(["--variant", "mesh", "--mean-recurrence", "2"]) == 2
    assert "needs --mesh-routers shared" in capsys.readouterr().err


def test_flags_are_checked_before_print_config_and_recorded_in_the_recipe(capsys):
    """tools/ablate.py checks each --arm with --print-config: a recurrence the model cannot run is
    refused there; an accepted one is a `training` key of the recipe (so --load resumes it)."""
    from mesh_megatron.training import arguments

    flags = ["--recurrence-sampling", "poisson-lognormal", "--mean-recurrence", "1", "--backprop-depth", "2"]
    with pytest.raises(ConfigError, match="needs --mesh-routers shared"):
        arguments.parse(flags + ["--print-config"], world_size=1)
    with pytest.raises(SystemExit) as stop:
        arguments.parse(flags + ["--mesh-routers", "shared", "--mesh-step-embedding", "--print-config"], world_size=1)
    assert stop.value.code in (0, None)
    printed = capsys.readouterr().out
    for line in ("recurrence_sampling: poisson-lognormal", "mean_recurrence: 1.0", "backprop_depth: 2",
                 "mesh_routers: shared", "mesh_step_embedding: true"):
        assert line in printed, line
