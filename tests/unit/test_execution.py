"""How the model runs, not what it computes: attention backends, activation recompute and
the MeSH buffer's activation memory. Each test compares two executions of the same weights."""

import pytest
import torch

from mesh_megatron.config import ConfigError, ExecutionConfig, preset, to_transformer_config, validate
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.model.attention import SDPAttention, resolve_attention_backend
from mesh_megatron.parallel.initialize import set_seed

SEQ, BATCH = 32, 2


def build(variant, execution, layout=None, **overrides):
    cfg = preset("tiny", variant, layout, seq_length=SEQ, **overrides)
    validate(cfg)
    return MeshGPTModel(cfg, to_transformer_config(cfg), execution=execution, init_seed=11)


def tokens(seed=0):
    t = torch.randint(0, 4096, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


def run(model, seed=5):
    """(logits, loss, {name: grad}) of one training-mode forward/backward from a fixed RNG."""
    set_seed(seed)
    inputs, labels = tokens()
    model.train()
    loss = model(inputs, labels=labels).mean()
    loss.backward()
    with torch.no_grad():
        model.eval()
        logits = model(inputs)
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(a, b, rel):
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() <= rel * scale, ((a - b).abs().max() / scale).item()


@pytest.mark.parametrize("variant", ["vanilla", "base", "anchor_emb", "mesh"])
def test_sdpa_equals_local(megatron_single, variant):
    ref = run(build(variant, ExecutionConfig(attention_backend="local")))
    got = run(build(variant, ExecutionConfig(attention_backend="sdpa")))
    assert (got[0] - ref[0]).abs().max() <= 1e-5
    assert abs(got[1] - ref[1]) <= 1e-5
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert (got[2][name] - ref[2][name]).abs().max() <= 1e-5, name


def test_sdpa_is_the_cpu_default_and_te_is_refused_without_a_gpu(megatron_single):
    assert resolve_attention_backend("auto") == "sdpa"
    model = build("mesh", ExecutionConfig())
    cores = [m for m in model.modules() if isinstance(m, SDPAttention)]
    assert len(cores) == len(model.block.prelude) + len(model.block.core) + len(model.block.coda)
    with pytest.raises(ConfigError, match="Transformer Engine"):
        build("mesh", ExecutionConfig(attention_backend="te"))
    with pytest.raises(ConfigError, match="recompute"):
        build("mesh", ExecutionConfig(recompute="everything"))


@pytest.mark.parametrize("variant", ["vanilla", "base", "mesh"])
@pytest.mark.parametrize("recompute", ["loop", "layer"])
def test_recompute_equals_none_with_dropout(megatron_single, variant, recompute):
    # Dropout on: recompute must replay the same masks (megatron's RNG-aware checkpoint).
    kw = dict(hidden_dropout=0.1, attention_dropout=0.1)
    ref = run(build(variant, ExecutionConfig(recompute="none"), **kw))
    got = run(build(variant, ExecutionConfig(recompute=recompute), **kw))
    assert_close(got[1], ref[1], 1e-6)
    # Recompute changes the order in which the several uses of a state add up its gradient
    # (inside the checkpointed block first, then the routers): fp32 rounding of activation
    # gradients, ~1e-7 of their size. Parameters whose gradient is a cancelling sum (router
    # biases: softmax gradients sum to zero over slots) inherit that error relative to the
    # terms, not to their small sum; so rel 1e-6 is taken against the model's largest
    # gradient entry. (Measured: the worst tensor is a router bias at 3e-10 absolute.)
    scale = max(g.abs().max() for g in ref[2].values())
    for name in ref[2]:
        assert (got[2][name] - ref[2][name]).abs().max() <= 1e-6 * scale, name
    # and dropout really is on: another seed gives another loss
    other = run(build(variant, ExecutionConfig(recompute=recompute), **kw), seed=6)
    assert abs(other[1] - ref[1]) > 1e-4


def saved_bytes(model) -> int:
    """Bytes autograd keeps for backward in one training forward (distinct storages)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    set_seed(0)
    inputs, labels = tokens()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs, labels=labels).mean()
    return total


def test_mesh_keeps_no_buffer_copy_for_backward(megatron_single):
    # 1+2R2+1, B = K + 3 = 5: a materialised buffer would keep (K + 1) * B = 15 states of
    # [s, b, h]; the linear form keeps the K + 1 written values and h_emb beyond base.
    state = SEQ * BATCH * 64 * 4  # one fp32 [s, b, h]
    base = saved_bytes(build("base", ExecutionConfig()))
    mesh = saved_bytes(build("mesh", ExecutionConfig()))
    loops = 2
    assert mesh - base <= (loops + 2) * state + 64 * 1024, (mesh - base) / state


@pytest.mark.parametrize("recompute", ["loop", "layer"])
def test_recompute_keeps_less(megatron_single, recompute):
    none = saved_bytes(build("mesh", ExecutionConfig(recompute="none")))
    less = saved_bytes(build("mesh", ExecutionConfig(recompute=recompute)))
    assert less < 0.5 * none, (less, none)
