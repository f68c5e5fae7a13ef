"""Mixture-of-Recursions, expert choice (model/mor.py).

Capacity 1 everywhere is the dense recursion h + g * core(h) exactly; below 1 the core sees
exactly the kept tokens, in causal order, each at its own rotary position, and equals running
each sequence's kept tokens alone; a dropped token never comes back; the auxiliary loss reaches
the routers through MoEAuxLossAutoScaler with exactly its weight, and without it the routers
learn only through the gate."""

import dataclasses
import pytest
import torch

import tiny_models
from mesh_megatron.config import ConfigError, ExecutionConfig, preset, to_transformer_config, validate
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.model.mor import AuxLossScale, MoRStatePassing, aux_losses, gather_rotary
from mesh_megatron.parallel.initialize import set_seed

SEQ, BATCH = 16, 2


def build(layout="1+2R2+1", seed=11, execution=None, **overrides):
    return tiny_models.build("mor", layout, execution, seed, SEQ, **overrides)


def tokens(seed=0):
    return tiny_models.tokens(seed, SEQ, BATCH)


@torch.no_grad()
def spread_routers(model, seed=4, scale=0.5):
    """Router weights large enough that the scores differ clearly between tokens."""
    gen = torch.Generator().manual_seed(seed)
    for r in model.block.state_passing.routers:
        r.weight.copy_(torch.randn(r.weight.shape, generator=gen) * scale / r.weight.shape[1] ** 0.5)


def head(model, h):
    logits, _ = model.output_layer(model.final_layernorm(h))
    return logits.transpose(0, 1)


def dense_logits(model, inputs):
    """The plain recursion with MoR's update at every token: h + alpha * sigmoid(router(h)) * core(h)."""
    block, sp = model.block, model.block.state_passing
    rot = model.rotary_pos_emb(inputs.shape[1])
    h = block._run(block.prelude.values(), model.embed(inputs), rot, None)
    for t in range(block.loops):
        _, g = sp.scores(t, h)
        h = h + g[..., None] * block._run(block.core, h, rot, None, t)
    return head(model, block._run(block.coda.values(), h, rot, None))


def per_sequence_logits(model, inputs):
    """Each sequence alone, its kept tokens (as the model chose them) run as a short sequence
    with their own rotary rows: what the batched gather must equal."""
    block, sp = model.block, model.block.state_passing
    rot = model.rotary_pos_emb(inputs.shape[1])
    h = block._run(block.prelude.values(), model.embed(inputs), rot, None)
    for t, routing in enumerate(sp.last):
        _, g = sp.scores(t, h)
        cols = []
        for b in range(inputs.shape[0]):
            idx = routing.index[:, b]
            y = block._run(block.core, h[idx, b:b + 1], rot[idx], None, t)  # [k, 1, h]
            col = h[:, b:b + 1].clone()
            col[idx] = col[idx] + g[idx, b:b + 1, None] * y
            cols.append(col)
        h = torch.cat(cols, dim=1)
    return head(model, block._run(block.coda.values(), h, rot, None))


@torch.no_grad()
def test_capacity_one_is_the_dense_recursion_exactly(megatron_single):
    model = build(mor_capacities="1,1")
    spread_routers(model)
    inputs, _ = tokens()
    assert torch.equal(model(inputs), dense_logits(model, inputs))
    # and the gate matters: another router gives other logits
    model.block.state_passing.routers[0].bias.add_(1.0)
    assert not torch.allclose(model(inputs), dense_logits(build(mor_capacities="1,1"), inputs))


@torch.no_grad()
def test_core_runs_exactly_the_kept_tokens_in_causal_order(megatron_single):
    model = build("1+1R3+1", mor_capacities="1,0.75,0.5")
    spread_routers(model)
    seen = []
    model.block.core[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    inputs, _ = tokens()
    logits = model(inputs)
    assert seen == [(16, BATCH, 64), (12, BATCH, 64), (8, BATCH, 64)]
    routes = model.block.state_passing.last
    assert [tuple(r.index.shape) for r in routes] == [(16, BATCH), (12, BATCH), (8, BATCH)]
    for prev, cur in zip(routes, routes[1:]):
        assert (cur.index[1:] > cur.index[:-1]).all()  # causal order
        for b in range(BATCH):  # a token dropped at r is never selected later
            assert set(cur.index[:, b].tolist()) <= set(prev.index[:, b].tolist())
            assert cur.active[:, b].sum() == prev.index.shape[0]
    # the two sequences keep different tokens (routing is per sequence)
    assert not torch.equal(routes[2].index[:, 0], routes[2].index[:, 1])
    # each kept token is the best-scoring active one: the k-th kept >= every dropped active
    for r in routes:
        g = torch.sigmoid(r.logits)
        for b in range(BATCH):
            kept = torch.zeros(SEQ, dtype=torch.bool)
            kept[r.index[:, b]] = True
            dropped = r.active[:, b] & ~kept
            if dropped.any():
                assert g[kept, b].min() >= g[dropped, b].max()
    ref = per_sequence_logits(model, inputs)
    assert (logits - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gathered_rotary_rows_are_the_tokens_own_positions():
    rot = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 1, 4)
    index = torch.tensor([[0, 2], [3, 5], [7, 6]])
    got = gather_rotary(rot, index)
    assert got.shape == (3, 2, 1, 4) and torch.equal(got[..., 0, 0], index.float())


def router_grads(model, inputs, labels, detach_gate=False, monkeypatch=None):
    AuxLossScale.set(1.0)
    model.zero_grad()
    model.train()
    if detach_gate:
        step = MoRStatePassing.step

        def detached(self, r, h, y, carry):
            routing = carry.routing
            return step(self, r, h, y, carry._replace(routing=routing._replace(gate=routing.gate.detach())))
        monkeypatch.setattr(MoRStatePassing, "step", detached)
    model(inputs, labels=labels).mean().backward()
    sp = model.block.state_passing
    return sp.records.pop(), [r.weight.grad.clone() if r.weight.grad is not None else torch.zeros_like(r.weight)
                              for r in sp.routers]


@pytest.mark.parametrize("capacities", ["1,1", "1,0.5"])
def test_aux_loss_reaches_the_routers_with_its_weight(megatron_single, capacities):
    """grad(weight w) - grad(weight 0) == w * grad(BCE): the autoscaler adds exactly the auxiliary
    loss's gradient (at capacity 1 too, where BCE pushes every logit towards 'kept')."""
    inputs, labels = tokens()
    w = 0.25
    lm = build(mor_capacities=capacities, mor_aux_weight=0.0)
    both = build(mor_capacities=capacities, mor_aux_weight=w)
    _, g0 = router_grads(lm, inputs, labels)
    rec, gw = router_grads(both, inputs, labels)
    # the BCE alone, through the same routing, from the states each router read
    sp = both.block.state_passing
    states = router_inputs(both, inputs)
    sp.records.clear()
    bce = sum(aux_losses(r._replace(logits=sp.routers[t](h).squeeze(-1).float()))[0]
              for t, (r, h) in enumerate(zip(sp.last, states)))
    assert torch.allclose(bce.detach(), rec[0].float(), rtol=1e-6)
    gb = torch.autograd.grad(bce, [r.weight for r in sp.routers])
    for a, b, c in zip(gw, g0, gb):
        assert c.abs().sum() > 0
        assert torch.allclose(a - b, w * c, rtol=1e-4, atol=1e-9 * float(c.abs().max()))


def router_inputs(model, inputs):
    """The state entering each iteration (what its router read, with its graph: a later router's
    BCE reaches an earlier router through the gate), from the observer."""
    states = {}
    model(inputs, observe=lambda name, h: states.__setitem__(name, h))
    return [states[f"h{t}"] for t in range(model.block.loops)]


def test_without_aux_loss_routers_learn_only_through_the_gate(megatron_single, monkeypatch):
    inputs, labels = tokens()
    model = build(mor_capacities="1,0.5", mor_aux_weight=0.0)
    spread_routers(model)
    _, grads = router_grads(model, inputs, labels)
    assert all(g.abs().sum() > 0 for g in grads)
    # the same with the gate's gradient cut: nothing else reaches them (top-k is not differentiable)
    _, grads = router_grads(model, inputs, labels, detach_gate=True, monkeypatch=monkeypatch)
    assert all(g.abs().sum() == 0 for g in grads)


@pytest.mark.parametrize("routing", ["expert-choice", "token-choice"])
def test_recompute_loop_equals_none(megatron_single, routing):
    out = []
    for mode in ("none", "loop"):
        if routing == "token-choice":  # (model/mor_token.py: padded recursions, balancing loss)
            model = build(mor_routing=routing, mor_balance_weight=0.1, mor_z_loss=0.01,
                          execution=ExecutionConfig(recompute=mode))
            spread_depth_router(model)
        else:
            model = build(mor_capacities="1,0.5", mor_z_loss=0.01, execution=ExecutionConfig(recompute=mode))
            spread_routers(model)
        set_seed(5)
        AuxLossScale.set(1.0)
        inputs, labels = tokens()
        model.train()
        model(inputs, labels=labels).mean().backward()
        out.append({n: p.grad for n, p in model.named_parameters()})
    assert model.block.recomputed == 4
    for n in out[0]:
        assert torch.allclose(out[1][n], out[0][n], rtol=1e-5, atol=1e-8), n


def test_aux_loss_decreases_in_a_short_run(megatron_single):
    """The router learns to predict its own top-k: the BCE (summed over the 2 iterations) falls
    from 1.28 to 0.36 over 40 Adam steps at weight 0.1 (at the default 0.001, 1.28 -> 1.16: slower,
    the gate's own gradient dominates)."""
    model = build(mor_capacities="1,0.5", mor_aux_weight=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    AuxLossScale.set(1.0)
    model.train()
    bce = []
    for step in range(40):
        inputs, labels = tokens(seed=step % 4)
        opt.zero_grad()
        model(inputs, labels=labels).mean().backward()
        opt.step()
        bce.append(float(model.block.state_passing.records.pop()[0]))
    assert sum(bce[-5:]) / 5 < 0.5 * sum(bce[:5]) / 5, bce


def test_mor_flags_are_checked():
    with pytest.raises(ConfigError, match="one capacity per iteration"):
        validate(preset("tiny", "mor", mor_capacities="1"))
    with pytest.raises(ConfigError, match="never grow"):
        validate(preset("tiny", "mor", mor_capacities="0.5,1"))
    with pytest.raises(ConfigError, match="never grow"):
        validate(preset("tiny", "mor", mor_capacities="1,0"))
    with pytest.raises(ConfigError, match="malformed"):
        validate(preset("tiny", "mor", mor_capacities="1,x"))
    with pytest.raises(ConfigError, match="no MoR routers"):
        validate(preset("tiny", "mesh", mor_capacities="1,0.5"))
    with pytest.raises(ConfigError, match="mor_routing 'bogus' is unknown"):
        validate(preset("tiny", "mor", mor_routing="bogus"))
    for loop_input in ({"input_injection": "add"}, {"input_injection": "concat-adapter", "state_init": "noise"},
                       {"state_init": "noise"}):
        with pytest.raises(ConfigError, match="--input-injection/--state-init noise with variant 'mor'"):
            validate(preset("tiny", "mor", **loop_input))
    validate(preset("tiny", "mor", lora_rank=4))  # relaxed sharing combines (test_export: its parity)
    assert preset("tiny", "mor", layout="1+1R4+1").capacities == (1.0, 0.75, 0.5, 0.25)
    assert preset("tiny", "mor", mor_capacities=[1, 0.5]).capacities == (1.0, 0.5)


def test_flops_count_the_tokens_each_iteration_processes(megatron_single, capsys):
    """tiny 1+2R2+1, capacities 1, 0.5 at s = 128: 5 layers per token for the matmuls
    (1 + 2 * (1 + 0.5) + 1), 4.5 for attention (1 + 2 * (1 + 0.25) + 1), routers K * h."""
    import json

    from mesh_megatron.model.accounting import processed_fractions, training_flops_per_token
    from tools.model_summary import main

    h, V, s = 64, 4096, 128
    cfg = preset("tiny", "mor", mor_capacities="1,0.5")
    assert training_flops_per_token(cfg) == 6 * (5 * 12 * h * h + 2 * h + h * V) + 12 * 4.5 * h * s == 3_490_560
    # capacity 1 everywhere: base's count plus the routers
    full = preset("tiny", "mor", mor_capacities="1,1")
    assert training_flops_per_token(full) - training_flops_per_token(preset("tiny", "base")) == 6 * 2 * h
    # k_r as the model keeps it (int(capacity * s)): what test_core_runs_exactly_the_kept_tokens counts
    assert processed_fractions(preset("tiny", "mor", "1+1R3+1", seq_length=16, mor_capacities="1,0.75,0.5")) == (1, 0.75, 0.5)
    assert processed_fractions(preset("tiny", "mor", "1+1R3+1", seq_length=10)) == (1.0, 0.6, 0.3)
    assert main(["--variant", "mor", "--mor-capacities", "1,0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops_per_token"] == 3_490_560 and out["router"] == 2 * (h + 1)
    assert out["processed_fractions"] == [1.0, 0.5] and out["effective_depth"] == [5.0, 4.5]


# -----------------------------------------------------------------------------
# Hugging Face export (hf/modeling_mesh.py)


@pytest.fixture
def exported(megatron_single, tmp_path):
    """A MoR training model (capacities 1, 0.5, spread routers), saved as training does and exported."""
    from test_export import save_like_training

    from mesh_megatron.conversion.to_hf import export_to_hf

    cfg = preset("tiny", "mor", seq_length=32, mor_capacities="1,0.5")
    model = MeshGPTModel(cfg, to_transformer_config(cfg), init_seed=3).eval()
    spread_routers(model, scale=2.0)
    save_like_training(tmp_path / "ckpt", cfg, model.state_dict())
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    return model, tmp_path / "hf"


def load(path, **overrides):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32, **overrides).eval()


def test_export_full_sequence_forward_routes_as_training(exported):
    import json

    model, path = exported
    config = json.loads((path / "config.json").read_text())
    assert (config["state_passing"], config["mor_capacities"], config["mor_alpha"], config["mor_kv"]) == \
        ("mor", [1.0, 0.5], 0.1, "recursion")
    hf = load(path)
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        got = hf(ids, output_hidden_states=True)
    assert ((got.logits - want).abs().max() / want.abs().max()).item() <= 1e-5
    # hidden states: h_1 differs from h_0 everywhere (capacity 1), h_2 from h_1 at exactly the 16 kept tokens
    h0, h1, h2 = got.hidden_states[2:5]
    assert (h1 - h0).abs().amax(-1).gt(0).all()
    moved = (h2 - h1).abs().amax(-1).gt(0)  # [b, s]
    kept = torch.zeros(32, 2, dtype=torch.bool).scatter_(0, model.block.state_passing.last[1].index, True).t()
    assert torch.equal(moved, kept) and kept.sum(1).tolist() == [16, 16]
    # and back: the import reads the MoR fields (and the routers, by the key map)
    from mesh_megatron.checkpoint.reader import open_checkpoint
    from mesh_megatron.conversion.from_hf import import_from_hf

    import_from_hf(str(path), str(path.parent / "back"))
    back = open_checkpoint(str(path.parent / "back")).model
    assert (back.variant, back.capacities, back.mor_alpha, back.mor_kv) == ("mor", (1.0, 0.5), 0.1, "recursion")


@pytest.mark.parametrize("kv", ["recursion", "share-first"])
def test_export_cached_equals_uncached(exported, kv):
    """Causal (threshold) routing: a prefix then one token at a time through the KV cache gives the
    full sequence's logits, for both KV modes (chosen at load time); greedy generate() too."""
    model, path = exported
    hf = load(path, mor_kv=kv)
    assert hf.config.mor_kv == kv
    ids = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = hf(ids, mor_inference="threshold").logits
        out = hf(ids[:, :12], use_cache=True, mor_inference="threshold")
        cache, steps = out.cache, [out.logits]
        for i in range(12, 20):
            out = hf(ids[:, i:i + 1], cache=cache, use_cache=True)  # a cache: threshold under "auto"
            cache = out.cache
            steps.append(out.logits)
    assert ((torch.cat(steps, 1) - full).abs().max() / full.abs().max()).item() <= 1e-5
    chosen = cache.mor_selected  # [b, 20] per recursion: routing is not trivial, and hierarchical
    assert len(chosen) == 2 and chosen[1].shape == (2, 20)
    assert 0 < chosen[1].sum() < chosen[0].sum() and not (chosen[1] & ~chosen[0]).any()
    # cache entries: prelude 0, core at recursion 0 (1, 2) and 1 (3, 4), coda 5; share-first never fills
    # recursion 1's (it reads recursion 0's keys and values)
    lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths == ([20, 20, 20, 0, 0, 20] if kv == "share-first" else [20] * 6), lengths
    with torch.no_grad():
        cached = hf.generate(ids[:1, :7], max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True)
        uncached = hf.generate(ids[:1, :7], max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (1, 19) and torch.equal(cached, uncached)
    if kv == "share-first":  # the KV mode matters: recursion-wise attention gives other logits
        other = load(path)
        with torch.no_grad():
            assert not torch.allclose(other(ids, mor_inference="threshold").logits, full, rtol=1e-3)
    with pytest.raises(ValueError, match="no KV cache"):
        hf(ids, cache=cache, mor_inference="top-k")
    for depth in ({"num_loops": 1}, {"cache_iterations": 1}, {"exit_threshold": 0.1}):
        with pytest.raises(ValueError, match="MoR runs exactly its K iterations"):
            hf(ids, **depth)
    with pytest.raises(ValueError, match="runs 1..2 iterations"):
        hf(ids, num_loops=3)


def probe_export(path, batches=1):
    """(the loaded export, the capture of one random batch, the probe's `mor` report over `batches`
    copies of that batch)."""
    from mesh_megatron.analysis.probe import ProbeSettings, _Accumulator
    from mesh_megatron.analysis.states import StateReader

    hf = load(path)
    reader = StateReader(hf)
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(4))
    capture = reader(ids)
    acc = _Accumulator(reader, ProbeSettings())
    for _ in range(batches):
        acc.add(capture)
    return hf, capture, acc.result()["mor"]


def test_probe_reports_kept_fraction_and_router_scores(exported, tmp_path):
    """Kept fraction per recursion is training's k_r / s exactly; the threshold fraction and agreement
    are counted over the active tokens, and equal a direct count from the routers' logits."""
    model, path = exported
    hf, capture, mor = probe_export(path)
    assert mor["kept_fraction"] == [1.0, 0.5] and mor["active_fraction"] == [1.0, 1.0]
    logits = [r[0] for r in capture.mor]
    assert torch.equal(logits[0], hf.gpt_neox.mor.routers[0](capture.states[1]))  # router 0 reads h0
    kept0 = capture.mor[0][1]
    passing = torch.sigmoid(logits[1].double()) > 0.5  # at recursion 1 the active tokens are all (kept0)
    assert mor["threshold_fraction"][1] == pytest.approx(passing[kept0].double().mean().item(), abs=1e-12)
    agree = (passing == capture.mor[1][1])[kept0].double().mean().item()
    assert mor["agreement"][1] == pytest.approx(agree, abs=1e-12) and 0 < agree < 1
    assert all(abs(sum(row) - 1) < 1e-12 and len(row) == 10 for row in mor["score_histogram"])


# -----------------------------------------------------------------------------
# Token choice (model/mor_token.py): one router, a depth per token


def build_tc(layout="1+1R3+1", seed=11, **overrides):
    return build(layout, seed, mor_routing="token-choice", **overrides)


@torch.no_grad()
def spread_depth_router(model, seed=4, scale=3.0):
    """A token-choice router whose depths differ clearly between tokens."""
    router = model.block.state_passing.router
    gen = torch.Generator().manual_seed(seed)
    router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * scale / router.weight.shape[1] ** 0.5)


def per_sequence_tc_logits(model, inputs):
    """Each sequence alone, unpadded: at recursion r its tokens with depth >= r as one short sequence
    (own rotary rows); h_{r+1} = f(h_r) while going on, h_0 + g f(h_r) at the last one."""
    block, sp = model.block, model.block.state_passing
    rot = model.rotary_pos_emb(inputs.shape[1])
    h0 = block._run(block.prelude.values(), model.embed(inputs), rot, None)
    routing = sp.route(h0)
    cols = []
    for b in range(inputs.shape[0]):
        h, d = h0[:, b:b + 1].clone(), routing.depth[:, b]
        for t in range(block.loops):
            idx = torch.nonzero(d >= t).flatten()
            if idx.numel():
                y = block._run(block.core, h[idx], rot[idx], None, t)
                last = (d[idx] == t)[:, None, None]
                h[idx] = torch.where(last, h0[idx, b:b + 1] + routing.gate[idx, b:b + 1, None] * y, y)
        cols.append(h)
    return head(model, block._run(block.coda.values(), torch.cat(cols, dim=1), rot, None))


@torch.no_grad()
def test_token_choice_runs_each_token_through_its_depth(megatron_single):
    """Recursion r runs exactly the tokens routed to depth >= r, in causal order (each sequence
    padded at its end to the batch's largest count); the batch equals each sequence run alone."""
    model = build_tc()
    spread_depth_router(model)
    seen = []
    model.block.core[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    inputs, _ = tokens()
    logits = model(inputs)
    sp = model.block.state_passing
    depth = sp.routing.depth  # [s, b]
    assert sorted(set(depth.flatten().tolist())) == [0, 1, 2]  # all three depths occur
    counts = [(depth >= r).sum(0).tolist() for r in range(3)]
    assert counts[1] != [counts[1][0]] * BATCH  # the sequences differ: padding is exercised
    assert seen == [(max(c), BATCH, 64) for c in counts]
    for r, rec in enumerate(sp.last):
        assert rec.valid.sum(0).tolist() == counts[r]
        for b in range(BATCH):
            n = counts[r][b]
            assert torch.equal(rec.index[:n, b], torch.nonzero(depth[:, b] >= r).flatten())  # causal order
            assert not rec.valid[n:, b].any()
    # the gate is the chosen depth's probability
    assert torch.equal(sp.routing.gate, sp.routing.probs.gather(-1, depth[..., None]).squeeze(-1))
    ref = per_sequence_tc_logits(model, inputs)
    assert (logits - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_token_choice_records_what_each_recursion_ran_on(megatron_single):
    """A training forward records, after [balance, z], k_r / s per recursion: the gathered length
    the core ran on (the batch's largest count, padding included: it is computed), which the
    training log's FLOPs use (accounting.processed_fractions(measured=...)); the FLOPs at those
    fractions are the FLOPs of a capacity run with the same k_r."""
    from mesh_megatron.model.accounting import training_flops_per_token
    from mesh_megatron.model.mor import pop_records

    model = build_tc().train()
    spread_depth_router(model)
    inputs, _ = tokens()
    model(inputs)
    depth = model.block.state_passing.routing.depth  # [s, b]
    total, count = pop_records([model])
    assert count == 1 and total.numel() == 2 + 3
    ran = [max((depth >= r).sum(0).tolist()) / depth.shape[0] for r in range(3)]
    assert total[2:].tolist() == pytest.approx(ran, abs=1e-7) and ran[0] == 1.0 and ran[2] < ran[1] < 1
    cfg = model.model_config
    estimate = training_flops_per_token(cfg)  # uniform depths: 1, 2/3, 1/3
    measured = training_flops_per_token(cfg, measured=ran)
    seq = cfg.seq_length
    as_capacities = training_flops_per_token(dataclasses.replace(cfg, mor_routing="expert-choice",
                                                                 mor_capacities=",".join(f"{k:g}" for k in ran)), seq)
    assert measured == as_capacities != estimate


@torch.no_grad()
def test_token_choice_forced_to_the_last_depth_is_the_plain_recursion(megatron_single):
    """Every token routed to depth K with gate 1 (router weight 0, bias -50 / +50, alpha 1): the plain
    recursion h_{r+1} = f(h_r), then h_0 + 1 * h_K, exactly. Ties go to the shallower depth."""
    model = build_tc("1+2R2+1", mor_alpha=1.0)
    router = model.block.state_passing.router
    router.weight.zero_()
    router.bias.copy_(torch.tensor([-50.0, 50.0]))
    inputs, _ = tokens()
    block = model.block
    rot = model.rotary_pos_emb(inputs.shape[1])
    h0 = block._run(block.prelude.values(), model.embed(inputs), rot, None)
    h = h0
    for t in range(block.loops):
        h = block._run(block.core, h, rot, None, t)
    want = head(model, block._run(block.coda.values(), h0 + h, rot, None))
    assert torch.equal(model(inputs), want)
    assert bool((model.block.state_passing.routing.gate == 1).all())
    router.bias.zero_()  # a tie everywhere: depth 1 (the first maximum) for every token, gate alpha / K
    other = model(inputs)
    assert bool((model.block.state_passing.routing.depth == 0).all()) and not torch.allclose(other, want)


def test_token_choice_balance_loss_is_logged_and_reaches_the_router(megatron_single):
    """The record is [balance, z] of this forward; grad(weight w) - grad(weight 0) == w * grad(L_bal),
    L_bal = K * sum_j frac_j * P_j recomputed from the router and the same depths."""
    inputs, labels = tokens()
    w = 0.5
    grads, recs = [], []
    for weight in (0.0, w):
        model = build_tc("1+2R2+1", mor_balance_weight=weight, mor_z_loss=0.0)
        spread_depth_router(model, scale=1.0)
        AuxLossScale.set(1.0)
        model.train()
        model(inputs, labels=labels).mean().backward()
        sp = model.block.state_passing
        recs.append(sp.records.pop())
        grads.append(sp.router.weight.grad.clone())
    states = {}
    model.zero_grad()
    model(inputs, observe=lambda name, h: states.__setitem__(name, h))
    sp.records.clear()
    probs = torch.softmax(sp.router(states["h0"]).float(), -1)
    depth = sp.routing.depth
    frac = torch.stack([(depth == j).double().mean() for j in range(2)]).float()
    bal = 2 * (frac * probs.mean((0, 1))).sum()
    assert 0 < frac[0] < 1 and bal.item() > 1.0  # both depths used, not balanced
    assert torch.allclose(recs[1][0], bal.detach(), rtol=1e-6) and torch.equal(recs[0], recs[1])
    z = (torch.logsumexp(sp.router(states["h0"]).float(), -1) ** 2).mean()
    assert torch.allclose(recs[1][1], z.detach(), rtol=1e-6)
    gb = torch.autograd.grad(bal, sp.router.weight)[0]
    assert gb.abs().sum() > 0 and grads[0].abs().sum() > 0  # the gate trains it too
    assert torch.allclose(grads[1] - grads[0], w * gb, rtol=1e-4, atol=1e-9 * float(gb.abs().max()))


def test_token_choice_loss_free_bias(megatron_single):
    """Loss-free balancing: the top-1 reads p + b (the gate stays p_d); a training forward moves b by
    exactly rate * sign(mean share - share_j) of its own depths, an eval forward not at all; b is a
    checkpointed buffer, not a parameter."""
    model = build_tc("1+2R2+1", mor_bias_rate=0.01, mor_balance_weight=0.0)
    spread_depth_router(model, scale=1.0)
    sp = model.block.state_passing
    assert "block.state_passing.depth_bias" in model.state_dict()
    assert all("depth_bias" not in n for n, _ in model.named_parameters())
    inputs, labels = tokens()
    with torch.no_grad():
        model.eval()
        model(inputs)
        plain = sp.routing.depth.clone()
        sp.depth_bias.copy_(torch.tensor([0.0, 0.05]))
        model(inputs)
    r = sp.routing
    assert torch.equal(r.depth, (r.probs + sp.depth_bias).argmax(-1)) and not torch.equal(r.depth, plain)
    assert torch.equal(r.gate, r.probs.gather(-1, r.depth[..., None]).squeeze(-1))
    assert torch.equal(sp.depth_bias, torch.tensor([0.0, 0.05]))  # eval: unchanged
    model.train()
    AuxLossScale.set(1.0)
    model(inputs, labels=labels).mean().backward()
    share = torch.stack([(sp.routing.depth == j).float().mean() for j in range(2)])
    assert share[0] != share[1]
    assert torch.equal(sp.depth_bias, torch.tensor([0.0, 0.05]) + 0.01 * torch.sign(share.mean() - share))


def test_token_choice_flags_and_flops(megatron_single, capsys):
    import json

    from mesh_megatron.model.accounting import processed_fractions, training_flops_per_token
    from tools.model_summary import main

    with pytest.raises(ConfigError, match="--mor-capacities/--mor-aux-weight with --mor-routing token-choice"):
        validate(preset("tiny", "mor", mor_routing="token-choice", mor_capacities="1,0.5"))
    with pytest.raises(ConfigError, match="--mor-capacities/--mor-aux-weight with --mor-routing token-choice"):
        validate(preset("tiny", "mor", mor_routing="token-choice", mor_aux_weight=0.1))
    with pytest.raises(ConfigError, match="--mor-balance-weight/--mor-bias-rate with --mor-routing expert-choice"):
        validate(preset("tiny", "mor", mor_balance_weight=0.1))
    with pytest.raises(ConfigError, match="--mor-balance-weight/--mor-bias-rate with --mor-routing expert-choice"):
        validate(preset("tiny", "mor", mor_bias_rate=0.01))
    with pytest.raises(ConfigError, match="mor_bias_rate=0.0 must be positive"):
        validate(preset("tiny", "mor", mor_routing="token-choice", mor_bias_rate=0.0))
    with pytest.raises(ConfigError, match="mor_balance_weight=-1.0 must be non-negative"):
        validate(preset("tiny", "mor", mor_routing="token-choice", mor_balance_weight=-1.0))
    with pytest.raises(ConfigError, match="no MoR routers"):
        validate(preset("tiny", "base", mor_balance_weight=0.1))
    tc = preset("tiny", "mor", mor_routing="token-choice")
    assert (tc.gate_alpha, tc.balance_weight, preset("tiny", "mor").gate_alpha) == (1.0, 0.01, 0.1)
    # FLOPs at the expected depths of a uniform router, (K - r) / K: for K = 2 expert choice's default count
    assert processed_fractions(preset("tiny", "mor", "1+1R3+1", mor_routing="token-choice")) == (1.0, 2 / 3, 1 / 3)
    assert training_flops_per_token(tc) == training_flops_per_token(preset("tiny", "mor")) == 3_490_560
    assert main(["--variant", "mor", "--mor-routing", "token-choice", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops_per_token"] == 3_490_560 and out["router"] == 2 * (64 + 1)  # Linear(h -> K)
    assert out["mor_routing"] == "token-choice"


@pytest.fixture
def exported_tc(megatron_single, tmp_path):
    """A token-choice MoR training model (K = 2, a spread router), saved as training does and exported."""
    from test_export import save_like_training

    from mesh_megatron.conversion.to_hf import export_to_hf

    cfg = preset("tiny", "mor", seq_length=32, mor_routing="token-choice", mor_bias_rate=0.01)
    model = MeshGPTModel(cfg, to_transformer_config(cfg), init_seed=3).eval()
    spread_depth_router(model)
    with torch.no_grad():  # loss-free balancing's bias, as training would have moved it
        model.block.state_passing.depth_bias.copy_(torch.tensor([0.0, 0.1]))
    save_like_training(tmp_path / "ckpt", cfg, model.state_dict())
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    return model, tmp_path / "hf"


def test_export_token_choice_routes_as_training(exported_tc):
    """Config mirror and key map; the export's depths are training's and its full-sequence logits equal
    training's (to 1e-5); cached decoding equals the full sequence for both KV modes, generate() too."""
    import json

    model, path = exported_tc
    config = json.loads((path / "config.json").read_text())
    assert (config["mor_routing"], config["mor_capacities"], config["mor_alpha"], config["mor_bias_rate"]) == \
        ("token-choice", None, 1.0, 0.01)
    hf = load(path)
    assert torch.equal(hf.gpt_neox.mor.router.weight, model.block.state_passing.router.weight)
    assert torch.equal(hf.gpt_neox.mor.depth_bias, torch.tensor([0.0, 0.1]))
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        got = hf(ids).logits
    assert torch.equal(hf.gpt_neox.mor.depth, model.block.state_passing.routing.depth.t())
    assert 0 < int(hf.gpt_neox.mor.depth.sum()) < ids.numel()  # both depths occur
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    with pytest.raises(ValueError, match="token-choice routing is causal"):
        hf(ids, mor_inference="top-k")
    for kv in ("recursion", "share-first"):
        hf = hf if kv == "recursion" else load(path, mor_kv=kv)
        with torch.no_grad():
            full = hf(ids[:, :20]).logits
            out = hf(ids[:, :12], use_cache=True)
            cache, steps = out.cache, [out.logits]
            for i in range(12, 20):
                out = hf(ids[:, i:i + 1], cache=cache, use_cache=True)
                cache = out.cache
                steps.append(out.logits)
            assert ((torch.cat(steps, 1) - full).abs().max() / full.abs().max()).item() <= 1e-5, kv
            lengths = [layer.get_seq_length() for layer in cache.layers]
            assert lengths == ([20, 20, 20, 0, 0, 20] if kv == "share-first" else [20] * 6), lengths
            cached = hf.generate(ids[:1, :7], max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True)
            uncached = hf.generate(ids[:1, :7], max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
        assert cached.shape == (1, 13) and torch.equal(cached, uncached), kv
        if kv == "share-first":  # the KV mode matters
            assert not torch.allclose(full, want[:, :20], rtol=1e-3)
    # and back: the import reads routing and router
    from mesh_megatron.checkpoint.reader import open_checkpoint
    from mesh_megatron.conversion.from_hf import import_from_hf

    import_from_hf(str(path), str(path.parent / "back"))
    back = open_checkpoint(str(path.parent / "back")).model
    assert (back.mor_routing, back.mor_capacities, back.gate_alpha, back.mor_bias_rate) == \
        ("token-choice", None, 1.0, 0.01)


def test_probe_reports_token_choice_depths(exported_tc):
    """Token choice: recursion r's processed fraction is the share of tokens of depth >= r, counted from
    the export's depths (which equal training's: test above); the mean router probability per depth is
    the softmax of the router on h0, averaged; the chosen-probability histogram covers every token."""
    _, path = exported_tc
    hf, capture, mor = probe_export(path, batches=2)  # two batches accumulate into the same shares
    depth = hf.gpt_neox.mor.depth
    assert mor["routing"] == "token-choice" and mor["recursions"] == ["loop 1", "loop 2"]
    deep = (depth == 1).double().mean().item()
    assert 0 < deep < 1
    assert mor["kept_fraction"] == pytest.approx([1.0, deep], abs=1e-12)
    assert mor["depth_fraction"] == pytest.approx([1 - deep, deep], abs=1e-12)
    with torch.no_grad():
        probs = torch.softmax(hf.gpt_neox.mor.router(capture.states[1]).double(), dim=-1)  # the router reads h0
    assert mor["mean_probability"] == pytest.approx(probs.mean((0, 1)).tolist(), abs=1e-6)
    chosen = probs.gather(-1, depth[..., None].to(capture.states[1].device)).flatten()  # p_d (argmax of p + bias)
    want = torch.histc(chosen, bins=10, min=0.0, max=1.0)
    assert mor["chosen_probability_histogram"] == pytest.approx((want / want.sum()).tolist(), abs=1e-12)
