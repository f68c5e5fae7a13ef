"""MeSH at any depth (model/state_passing.py SharedMeshStatePassing): shared routers with a
step embedding, exact against base at several depths; refusals; parameter count."""

import pytest
import torch

from mesh_megatron.config import ConfigError, RecurrenceConfig, preset, to_transformer_config, validate
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.model.accounting import ParameterCounts

SEQ, BATCH, SLOTS, BIG = 16, 2, 8, 1e4


def build(variant, layout, **overrides):
    cfg = preset("tiny", variant, layout, seq_length=SEQ, **overrides)
    validate(cfg)
    return MeshGPTModel(cfg, to_transformer_config(cfg), init_seed=0)


def one_hot_shared(model) -> None:
    """Step 0 (transitional) writes and reads slot 1 (its bias); loop iteration t's input is
    h_t + BIG e_t (step embedding row t = BIG x basis vector t) and the shared routers' row
    t + 2 is e_t, so iteration t writes and reads slot t + 2 alone: h_{t+1} = core(h_t)."""
    sp = model.block.state_passing
    with torch.no_grad():
        sp.step_embedding.zero_()
        for r in (sp.write_routers[0], sp.read_routers[0]):
            r.weight.zero_()
            r.bias.zero_()
            r.bias[1] = 1e3
        for r in (sp.write_routers[1], sp.read_routers[1]):
            r.weight.zero_()
            r.bias.zero_()
        for t in range(SLOTS - 2):
            sp.step_embedding[t, t] = BIG
            sp.write_routers[1].weight[t + 2, t] = 1.0
            sp.read_routers[1].weight[t + 2, t] = 1.0


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_shared_routers_one_hot_equal_base_at_any_depth(megatron_single, depth):
    """One set of shared-router weights (no parameter depends on K) loaded into layouts
    1+2R{n}+1 for n = 1, 3, 6 (= B - 2: each step has a fresh slot): logits equal base's
    at every depth. Red check: the step embedding left out of the routers' input sends
    every iteration to one slot and differs from base by O(1) at n = 3."""
    mesh = build("mesh", f"1+2R{depth}+1", mesh_routers="shared", mesh_step_embedding=True, mesh_slots=SLOTS)
    ref = build("mesh", "1+2R2+1", mesh_routers="shared", mesh_step_embedding=True, mesh_slots=SLOTS)
    assert mesh.state_dict().keys() == ref.state_dict().keys()  # the same parameters at any depth
    base = build("base", f"1+2R{depth}+1")
    missing, unexpected = mesh.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("state_passing." in n for n in missing)
    one_hot_shared(mesh)
    tokens = torch.randint(0, 4096, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = base(tokens), mesh(tokens)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-6


def test_shared_router_parameter_count(megatron_single):
    """2 pairs of Linear(h -> B) with bias plus the B x h step embedding, whatever K."""
    h, B = 64, SLOTS
    for layout in ("1+2R2+1", "1+2R5+1"):
        counts = ParameterCounts.of(build("mesh", layout, mesh_routers="shared", mesh_step_embedding=True,
                                          mesh_slots=B))
        assert counts.router == 2 * 2 * (h * B + B) + B * h
    per_step = ParameterCounts.of(build("mesh", "1+2R5+1", mesh_slots=B))
    assert per_step.router == 6 * 2 * (h * B + B)


def test_shared_mesh_trains_with_random_recurrence(megatron_single):
    """A drawn n = 6 > K = 2 with k = 2 (B = 8): finite loss; the shared pair and the step
    embedding rows of the last 2 iterations get a gradient (zeros at init: the routers start
    step-agnostic), the prefix's rows none. The transitional write router learns through the
    buffer (the last reads still see its write weights); its read router, whose read h0 feeds
    only the no_grad prefix, gets none."""
    cfg = preset("tiny", "mesh", seq_length=SEQ, mesh_routers="shared", mesh_step_embedding=True, mesh_slots=SLOTS)
    rec = RecurrenceConfig("poisson-lognormal", 3.0, 2, seed=1234)
    model = MeshGPTModel(cfg, to_transformer_config(cfg), recurrence=rec, init_seed=0)
    sp = model.block.state_passing
    assert not sp.step_embedding.any()
    tokens = torch.randint(0, 4096, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:], recurrence_key=(0, 2)).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert sp.step_embedding.grad[4:6].abs().sum() > 0  # the iterations with gradient: t = 4, 5
    assert not sp.step_embedding.grad[:4].any()  # the no_grad prefix
    for r in (*sp.write_routers, sp.read_routers[1]):
        assert r.weight.grad.abs().sum() > 0
    assert sp.read_routers[0].weight.grad is None


@pytest.mark.parametrize("overrides,needle", [
    (dict(variant="base", mesh_routers="shared"), "has no MeSH routers"),
    (dict(variant="vanilla+mesh", mesh_routers="shared"), "needs variant 'mesh'"),
    (dict(mesh_step_embedding=True), "add mesh_routers: shared"),
    (dict(mesh_routers="shared", mesh_router_init="base"), "use mesh_router_init 'paper'"),
    (dict(mesh_routers="global"), "mesh_routers 'global' is unknown"),
])
def test_shared_router_refusals(overrides, needle):
    variant = overrides.pop("variant", "mesh")
    with pytest.raises(ConfigError, match=needle):
        validate(preset("tiny", variant, **overrides))
