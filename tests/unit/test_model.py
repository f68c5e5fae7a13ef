"""The model on `tiny`: every variant trains, weight sharing is real, MeSH is exact."""

import math
import re

import pytest
import torch

from mesh_megatron.config import VARIANTS, preset, to_transformer_config, validate
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.model.state_passing import Router
from mesh_megatron.parallel.initialize import set_seed

SEQ, BATCH = 32, 2


def build(variant, layout=None, **overrides):
    cfg = preset("tiny", variant, layout, seq_length=SEQ, **overrides)
    validate(cfg)
    return MeshGPTModel(cfg, to_transformer_config(cfg))


def batch(seed=0):
    tokens = torch.randint(0, 4096, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_and_every_parameter_gets_a_gradient(megatron_single, variant):
    set_seed(0)
    model = build(variant)
    inputs, labels = batch()
    loss = model(inputs, labels=labels).mean()
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    if model.model_config.is_mesh:
        loops = model.model_config.parsed_layout.loops
        names = {n for n, _ in model.named_parameters()}
        for kind in ("write", "read"):
            assert {f"block.state_passing.{kind}_routers.{s}.weight" for s in range(loops + 1)} <= names


def unrolled_name(name: str, core_layers: int, loops: int, prelude: int, into_prelude: bool) -> list[str]:
    """Names in the unrolled model that hold the shared parameter `name`, one per loop."""
    m = re.match(r"block\.core\.(\d+)\.(.*)", name)
    if not m:
        return [name]
    i, rest = int(m.group(1)), m.group(2)
    if into_prelude:  # vanilla keeps the whole stack in `prelude`
        return [f"block.prelude.{prelude + t * core_layers + i}.{rest}" for t in range(loops)]
    return [f"block.core.{t * core_layers + i}.{rest}" for t in range(loops)]


def unrolled_coda_name(name: str, prelude: int, core: int, loops: int) -> str:
    m = re.match(r"block\.coda\.(\d+)\.(.*)", name)
    return f"block.prelude.{prelude + core * loops + int(m.group(1))}.{m.group(2)}" if m else name


@pytest.mark.parametrize("shared,unrolled", [("base", "vanilla"), ("mesh", "vanilla+mesh")])
def test_core_gradient_is_sum_over_iterations(megatron_single, shared, unrolled):
    """A looped model equals its unrolled copy (K distinct blocks holding the same weights);
    the shared core's gradient is the sum of the unrolled blocks' gradients."""
    set_seed(0)
    layout = "1+2R3+1"
    looped = build(shared, layout)
    flat = build(unrolled, layout)
    P, C, K = 1, 2, 3
    into_prelude = unrolled == "vanilla"
    mapping = {}
    for name, _ in looped.named_parameters():
        targets = unrolled_name(name, C, K, P, into_prelude)
        if into_prelude:
            targets = [unrolled_coda_name(t, P, C, K) for t in targets]
        mapping[name] = targets
    flat_params = dict(flat.named_parameters())
    assert sorted(t for ts in mapping.values() for t in ts) == sorted(flat_params)
    with torch.no_grad():
        for name, p in looped.named_parameters():
            for t in mapping[name]:
                flat_params[t].copy_(p)

    inputs, labels = batch(1)
    loss_looped = looped(inputs, labels=labels).mean()
    loss_flat = flat(inputs, labels=labels).mean()
    torch.testing.assert_close(loss_looped, loss_flat, rtol=1e-6, atol=0)
    loss_looped.backward()
    loss_flat.backward()
    for name, p in looped.named_parameters():
        expected = sum(flat_params[t].grad for t in mapping[name])
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7, msg=name)
        if len(mapping[name]) > 1:  # a shared core weight: every iteration contributes
            assert all(flat_params[t].grad.abs().sum() > 0 for t in mapping[name])


def test_mesh_with_one_hot_routers_equals_base(megatron_single):
    """Step s writes to fresh slot s+1 and reads it back: h0 = h_pre, h_{t+1} = core(h_t)."""
    set_seed(0)
    base = build("base")
    mesh = build("mesh")
    missing, unexpected = mesh.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("_routers." in n for n in missing)
    sp = mesh.block.state_passing
    with torch.no_grad():
        for s, (w, r) in enumerate(zip(sp.write_routers, sp.read_routers)):
            for router in (w, r):  # keep random weights; the bias alone decides the slot
                router.bias.zero_()
                router.bias[s + 1] = 1e3
    inputs, _ = batch(2)
    with torch.no_grad():
        a, b = base(inputs), mesh(inputs)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel <= 1e-6


def test_bf16_forward_keeps_router_softmax_in_fp32(megatron_single):
    set_seed(0)
    model = build("mesh").to(torch.bfloat16)
    seen = []
    for module in model.modules():
        if isinstance(module, Router):
            module.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    inputs, labels = batch()
    loss = model(inputs, labels=labels).mean()
    loss.backward()
    loops = model.model_config.parsed_layout.loops
    assert len(seen) == 2 * (loops + 1)
    assert all(inp == torch.bfloat16 and out == torch.float32 for inp, out in seen)
    assert torch.isfinite(loss)


def test_init_follows_the_paper(megatron_single):
    """Small init N(0, sqrt(2/(5h))), output projections / sqrt(2 * compute depth),
    embeddings scaled by sqrt(h) to std ~0.63, router std sqrt(2/(B h))."""
    set_seed(0)
    cfg = preset("tiny", "mesh", hidden_size=256, num_attention_heads=4, seq_length=SEQ)
    model = MeshGPTModel(cfg, to_transformer_config(cfg))
    small = (2 / (5 * 256)) ** 0.5
    params = dict(model.named_parameters())
    assert params["block.core.0.self_attention.linear_qkv.weight"].std().item() == pytest.approx(small, rel=0.05)
    depth = cfg.compute_depth
    for name in ("block.core.0.self_attention.linear_proj.weight", "block.coda.0.mlp.linear_fc2.weight"):
        assert params[name].std().item() == pytest.approx(small / (2 * depth) ** 0.5, rel=0.05)
    assert params["block.core.0.mlp.linear_fc1.bias"].abs().sum() == 0
    emb = model.embed(torch.arange(4096).view(1, -1))
    assert emb.std().item() == pytest.approx(small * 256 ** 0.5, rel=0.05)
    router = params["block.state_passing.write_routers.0.weight"]
    assert router.std().item() == pytest.approx((2 / (cfg.slots * 256)) ** 0.5, rel=0.15)


def _router_masses(model):
    """Hooks recording, per router call, (step, kind, off-slot mass [s, b], max |W h|)."""
    seen = []
    sp = model.block.state_passing
    for kind, routers in (("write", sp.write_routers), ("read", sp.read_routers)):
        for step, router in enumerate(routers):
            def hook(m, inputs, out, step=step, kind=kind):
                logits = torch.nn.functional.linear(inputs[0].float(), m.weight.float())  # W h, no bias
                seen.append((step, kind, 1 - out[..., step + 1], logits.abs().max().item()))
            router.register_forward_hook(hook)
    return seen


def test_mesh_router_init_base_starts_as_base(megatron_single):
    """--mesh-router-init base: bias +b on slot s + 1 of step s's routers, weights as the paper.

    The bound: with router logits W h of at most M in size, a softmax puts at most
    eps = (B - 1) e^-(b - 2M) / (1 + (B - 1) e^-(b - 2M)) off its slot. Step 0's read is then
    h0 = r_0 h_emb + (r . w) h_pre with 1 - r . w <= eps_r + eps_w and r_0 <= eps_r, so
    |h0 - h_pre| <= eps_r |h_emb| + (eps_r + eps_w) |h_pre| (max norms). At b = 4 the deviation is
    visible and inside the bound; at b = 30, eps < 1e-11 and the whole forward is base's to fp32
    rounding. The paper's init (bias 0) is O(1) away from base."""
    inputs, _ = batch(3)
    cfgs = {}
    for name, kw in (("base", {}), ("paper", {}), ("b4", dict(mesh_router_init="base")),
                     ("b30", dict(mesh_router_init="base", mesh_router_margin=30.0))):
        cfg = preset("tiny", "base" if name == "base" else "mesh", seq_length=SEQ, **kw)
        validate(cfg)
        cfgs[name] = MeshGPTModel(cfg, to_transformer_config(cfg), init_seed=1234).eval()
    assert cfgs["b4"].model_config.router_margin == 4.0  # the documented default
    B = cfgs["b4"].model_config.slots
    for name in ("paper", "b4", "b30"):
        sp = cfgs[name].block.state_passing
        margin = cfgs[name].model_config.router_margin
        for s, (w, r) in enumerate(zip(sp.write_routers, sp.read_routers)):
            for router in (w, r):
                expected = torch.zeros(B)
                expected[s + 1] = margin
                assert torch.equal(router.bias.detach(), expected), (name, s)

    states = {}
    with torch.no_grad():
        logits = {name: m(inputs) for name, m in cfgs.items()}
        for name in ("b4", "b30"):
            masses = _router_masses(cfgs[name])
            got = {}
            cfgs[name](inputs, observe=lambda n, h, got=got: got.__setitem__(n, h.clone()))
            states[name] = (got, masses)

    def eps_bound(margin, m):
        x = (B - 1) * math.exp(-(margin - 2 * m))
        return x / (1 + x)

    for name, margin in (("b4", 4.0), ("b30", 30.0)):
        got, masses = states[name]
        for step, kind, off, m in masses:  # every softmax within its bound
            assert off.max().item() <= eps_bound(margin, m) + 1e-7, (name, step, kind)
        step0 = {kind: (off, m) for step, kind, off, m in masses if step == 0}
        eps_w, eps_r = step0["write"][0].max().item(), step0["read"][0].max().item()
        h_emb = cfgs[name].embed(inputs)
        bound = eps_r * h_emb.abs().max().item() + (eps_r + eps_w) * got["h_pre"].abs().max().item()
        dev = (got["h0"] - got["h_pre"]).abs().max().item()
        assert dev <= bound * (1 + 1e-5) + 1e-6, (name, dev, bound)
        if name == "b4":
            assert dev > 0.05 * bound  # the bound is not vacuous: b = 4 really routes off-slot
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(logits["b30"], logits["base"]) <= 1e-6
    assert rel(logits["b4"], logits["base"]) > 1e-3  # a finite margin starts near, not at, base
    assert rel(logits["paper"], logits["base"]) > 0.1
