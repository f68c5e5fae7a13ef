"""Input injection and state initialisation (model/injection.py): the core reads h_t + e or
A [h_t; e]; the state starts from the prelude or from noise (zeros in eval); the export agrees."""

import dataclasses

import pytest
import torch

from mesh_megatron.config import ConfigError, RecurrenceConfig, preset, to_transformer_config, validate
from mesh_megatron.model import MeshGPTModel

SEQ, BATCH = 16, 2


def build(variant="base", layout=None, recurrence=None, **overrides):
    cfg = preset("tiny", variant, layout, seq_length=SEQ, **overrides)
    validate(cfg)
    return MeshGPTModel(cfg, to_transformer_config(cfg), init_seed=0, recurrence=recurrence)


def tokens(seed=0):
    return torch.randint(0, 4096, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def hand_built_logits(model, ids, zero_start):
    """base with injection `add`: h_0 = e (or 0), h_{t+1} = core(h_t + e), e = prelude output."""
    block = model.block
    rot = model.rotary_pos_emb(ids.shape[1])
    e = block._layers(block.prelude.values(), model.embed(ids), rot, None)
    h = torch.zeros_like(e) if zero_start else e
    for t in range(block.loops):
        h = block._layers(block.core_block(t), h + e, rot, None)
    h = block._layers(block.coda.values(), h, rot, None)
    logits, _ = model.output_layer(model.final_layernorm(h))
    return logits.transpose(0, 1)


@pytest.mark.parametrize("state_init", ["prelude", "noise"])
def test_add_injection_is_the_hand_built_loop_and_the_adapter_starts_as_add(megatron_single, state_init):
    """Eval: core reads h_t + e from h_0 = e (prelude) or 0 (noise's eval start), as written out by
    hand; concat-adapter at its init A = [I, I] gives the same logits. Red check: reading h_t
    alone (no injection) differs by O(1)."""
    ids = tokens()[:, :-1]
    add = build(input_injection="add", state_init=state_init).eval()
    concat = build(input_injection="concat-adapter", state_init=state_init).eval()
    missing, unexpected = concat.load_state_dict(add.state_dict(), strict=False)
    assert missing == ["block.injection.adapter.weight"] and not unexpected
    with torch.no_grad():
        a, c, ref = add(ids), concat(ids), hand_built_logits(add, ids, zero_start=state_init == "noise")
    assert torch.equal(a, ref)
    assert ((a - c).abs().max() / a.abs().max()).item() <= 1e-6


def test_noise_start_in_training_is_random_and_the_prelude_learns_through_injection(megatron_single):
    """Training: two forwards from different noise differ; with truncated backprop (n = 6, k = 2)
    the prelude and embedding still get a gradient through e in the last k iterations, which base
    without injection does not (tests/unit/test_recurrence.py)."""
    rec = RecurrenceConfig("poisson-lognormal", 3.0, 2, seed=1234)
    model = build(input_injection="concat-adapter", state_init="noise", recurrence=rec)
    t = tokens(1)
    torch.manual_seed(0)
    first = model(t[:, :-1], labels=t[:, 1:], recurrence_key=(0, 2)).mean()
    first.backward()
    torch.manual_seed(1)
    with torch.no_grad():
        second = model(t[:, :-1], labels=t[:, 1:], recurrence_key=(0, 2)).mean()
    assert first.item() != second.item()
    assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0
    assert model.block.prelude["0"].mlp.linear_fc1.weight.grad.abs().sum() > 0
    assert model.block.injection.adapter.weight.grad.abs().sum() > 0


def test_export_equals_training_model_at_depths(megatron_single, tmp_path):
    """base with the concat adapter and a noise start, exported: HF logits equal the training
    model's evaluation at K and, with num_loops, at 1 and 4 (the training model built at that
    layout with the same weights)."""
    from test_export import load_hf, rel_err, save_like_training, token_ids

    from mesh_megatron.conversion.to_hf import export_to_hf

    cfg = preset("tiny", "base", seq_length=32, input_injection="concat-adapter", state_init="noise")
    model = MeshGPTModel(cfg, to_transformer_config(cfg), init_seed=0).eval()
    with torch.no_grad():
        model.block.injection.adapter.weight.add_(0.05 * torch.randn_like(model.block.injection.adapter.weight))
    save_like_training(tmp_path / "ckpt", cfg, model.state_dict())
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    hf = load_hf(tmp_path / "hf")
    assert (hf.config.input_injection, hf.config.state_init) == ("concat-adapter", "noise")
    ids = token_ids()
    for n in (1, 2, 4):
        deep = MeshGPTModel(dataclasses.replace(cfg, layout=f"1+2R{n}+1"), to_transformer_config(cfg)).eval()
        deep.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert rel_err(hf(ids, num_loops=n).logits, deep(ids)) <= 1e-5, n


@pytest.mark.parametrize("variant,overrides,needle", [
    ("base", dict(input_injection="sum"), "input_injection 'sum' is unknown"),
    ("base", dict(state_init="zeros"), "state_init 'zeros' is unknown"),
    ("vanilla", dict(input_injection="add"), "has none"),
    ("vanilla+mesh", dict(input_injection="add"), "has none"),
    ("mesh", dict(state_init="noise", input_injection="add"), "transitional step defines"),
    ("base", dict(state_init="noise"), "prelude's output never reaches the loop"),
])
def test_injection_refusals(variant, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(preset("tiny", variant, **overrides))
