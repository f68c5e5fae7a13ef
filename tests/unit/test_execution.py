"""How the model runs, not what it computes: attention backends, activation recompute and
the MeSH buffer's activation memory. Each test compares two executions of the same weights."""

import pytest
import torch

import tiny_models
from mesh_megatron.config import ConfigError, ExecutionConfig
from mesh_megatron.model.attention import SDPAttention, core_attention_names, resolve_attention_backend
from mesh_megatron.parallel.initialize import set_seed

SEQ, BATCH = 32, 2


def build(variant, execution, layout=None, **overrides):
    return tiny_models.build(variant, layout, execution, 11, SEQ, **overrides)


def tokens(seed=0, seq=SEQ):
    return tiny_models.tokens(seed, seq, BATCH)


def run(model, seed=5):
    """(logits, loss, {name: grad}) of one training-mode forward/backward from a fixed RNG."""
    inputs, labels = tokens()
    loss, grads = tiny_models.train_step(model, inputs, labels, seed)
    with torch.no_grad():
        model.eval()
        logits = model(inputs)
    return logits, loss, grads


def assert_close(a, b, rel):
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() <= rel * scale, ((a - b).abs().max() / scale).item()


@pytest.mark.parametrize("variant", ["vanilla", "base", "anchor_emb", "mesh"])
def test_sdpa_equals_local(megatron_single, variant):
    local, sdpa = (build(variant, ExecutionConfig(attention_backend=b)) for b in ("local", "sdpa"))
    # Two different kernels really run (a backend name resolving to the other one would
    # make this a comparison of a kernel with itself).
    assert core_attention_names(local) == ["DotProductAttention"]
    assert core_attention_names(sdpa) == ["SDPAttention"]
    ref, got = run(local), run(sdpa)
    assert (got[0] - ref[0]).abs().max() <= 1e-5
    assert abs(got[1] - ref[1]) <= 1e-5
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert (got[2][name] - ref[2][name]).abs().max() <= 1e-5, name


@pytest.mark.parametrize("backend", ["local", "sdpa", "auto"])
def test_each_backend_builds_its_core_attention_in_every_layer(megatron_single, backend):
    """The core-attention class every layer holds: megatron's DotProductAttention for
    `local`, ours for `sdpa` and for `auto` on CPU (no Transformer Engine)."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    model = build("mesh", ExecutionConfig(attention_backend=backend))
    cores = [m.core_attention for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(cores) == len(model.block.prelude) + len(model.block.core) + len(model.block.coda)
    want = DotProductAttention if backend == "local" else SDPAttention
    assert all(type(c) is want for c in cores), [type(c) for c in cores]


def test_sdpa_is_the_cpu_default_and_te_is_refused_without_a_gpu(megatron_single):
    assert resolve_attention_backend("auto") == "sdpa"
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
    model = build(variant, ExecutionConfig(recompute=recompute), **kw)
    got = run(model)
    # recompute really reran the forward in backward: 1+2R2+1 as 4 blocks (prelude, 2 core
    # iterations, coda) under `loop`, else its 6 layer applications (vanilla has no loop)
    assert model.block.recomputed == (4 if recompute == "loop" and variant != "vanilla" else 6)
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
    inputs, labels = tokens(seq=model.model_config.seq_length)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs, labels=labels).mean()
    return total


def test_mesh_keeps_no_buffer_copy_for_backward(megatron_single):
    """The README's bound: MeSH keeps at most K + 2 hidden states [s, b, h] for backward
    beyond base. Counted exactly (1+2R2+1, B = K + 3 = 5): the K + 1 written values (h_emb
    is the prelude's input, which base keeps too) and, per router (a write and a read one
    per step, K + 1 steps), its weight [B, h] and fp32 softmax [s, b, B], plus one fp32
    [s, b, 1] read coefficient per (step, write so far). A materialised buffer would keep
    (K + 1) * B = 15 states. At width 256 the router terms are 0.375 of a state, so one
    extra [s, b, h] kept anywhere breaks both the count and the README's K + 2."""
    seq, hidden, loops, slots = 64, 256, 2, 5
    state = seq * BATCH * hidden * 4  # one fp32 [s, b, h]
    base = saved_bytes(build("base", ExecutionConfig(), seq_length=seq, hidden_size=hidden))
    mesh = saved_bytes(build("mesh", ExecutionConfig(), seq_length=seq, hidden_size=hidden))
    steps = loops + 1
    routers = 2 * steps * (slots * hidden + seq * BATCH * slots) * 4
    coefficients = steps * (steps + 1) // 2 * seq * BATCH * 4
    assert routers + coefficients < state
    assert mesh - base <= steps * state + routers + coefficients, (mesh - base) / state
    assert mesh - base <= (loops + 2) * state


@pytest.mark.parametrize("recompute", ["loop", "layer"])
def test_recompute_keeps_less(megatron_single, recompute):
    none = saved_bytes(build("mesh", ExecutionConfig(recompute="none")))
    less = saved_bytes(build("mesh", ExecutionConfig(recompute=recompute)))
    assert less < 0.5 * none, (less, none)
