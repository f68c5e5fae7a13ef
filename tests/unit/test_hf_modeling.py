"""Hugging Face MeshGPTNeoX model (mesh_megatron/hf): equivalence with transformers' GPT-NeoX, the state-passing
variants against a literal re-statement of docs/MESH_METHOD.md, KV cache, padding, save/load with remote code."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from mesh_megatron.hf import STATE_PASSING_VARIANTS, MeshGPTNeoXConfig, MeshGPTNeoXForCausalLM
from mesh_megatron.hf.modeling_mesh import rotary_cos_sin

VOCAB, HIDDEN, HEADS = 128, 64, 4


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=128,
        num_prelude_layers=1,
        num_core_layers=2,
        num_loops=2,
        num_coda_layers=1,
        state_passing="base",
        embedding_multiplier=math.sqrt(HIDDEN),
    )
    kwargs.update(overrides)
    if kwargs["state_passing"] == "vanilla+mesh":
        kwargs["core_shared"] = False
    return MeshGPTNeoXConfig(**kwargs)


def tiny_model(seed=0, **overrides):
    """Random model whose biases, LayerNorms, routers and scalars are all non-trivial."""
    torch.manual_seed(seed)
    model = MeshGPTNeoXForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "routers" in name:
                p.normal_(0.0, 0.3)  # far from uniform routing
            elif p.ndim == 1 or "state_scalars" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_ids(batch=2, seq=12, seed=1):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def gpt_neox_copy(mesh_model, layer_map, use_parallel_residual=True):
    """transformers' GPTNeoXForCausalLM whose layer i holds the weights of mesh layer layer_map[i]."""
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=len(layer_map),
        num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=use_parallel_residual,
        tie_word_embeddings=False,
        attention_bias=True,
    )
    ref = GPTNeoXForCausalLM(config).eval()
    src = mesh_model.state_dict()
    state = {}
    for name in ref.state_dict():
        if name.startswith("gpt_neox.layers."):
            i, rest = name.split(".", 3)[2:]
            state[name] = src[f"gpt_neox.layers.{layer_map[int(i)]}.{rest}"]
        else:  # transformers 5 renamed GPT-NeoX's embed_out to lm_head (it converts Pythia checkpoints on load)
            state[name] = src[name.replace("lm_head.", "embed_out.")]
    ref.load_state_dict(state, strict=True)
    return ref


# -----------------------------------------------------------------------------
# 1-3: the layer math against transformers' GPT-NeoX, and MeSH with one-hot routing against base


@pytest.mark.parametrize("use_parallel_residual", [True, False])
def test_plain_stack_equals_transformers_gpt_neox(use_parallel_residual):
    # base 1+2R1+1 with no embedding scaling is a plain 4-layer GPT-NeoX
    model = tiny_model(num_loops=1, embedding_multiplier=1.0, use_parallel_residual=use_parallel_residual)
    ref = gpt_neox_copy(model, [0, 1, 2, 3], use_parallel_residual)
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref(ids).logits) < 1e-5


def test_shared_core_equals_unrolled_stack():
    # base 1+2R3+1 runs prelude, core, core, core, coda: an 8-layer GPT-NeoX repeating the core weights
    model = tiny_model(num_loops=3, embedding_multiplier=1.0)
    ref = gpt_neox_copy(model, [0, 1, 2, 1, 2, 1, 2, 3])
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref(ids).logits) < 1e-5


def test_mesh_with_one_hot_routing_equals_base():
    base = tiny_model(state_passing="base")
    mesh = tiny_model(state_passing="mesh")  # B = K + 3 = 5
    missing, unexpected = mesh.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".mesh." in k for k in missing)
    with torch.no_grad():
        # step s writes only slot s + 1 and reads it back: h0 = h_pre and h_{t+1} = core(h_t), i.e. base
        for routers in (mesh.gpt_neox.mesh.write_routers, mesh.gpt_neox.mesh.read_routers):
            for s, router in enumerate(routers):
                router.bias.zero_()
                router.bias[s + 1] = 60.0
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(mesh(ids).logits, base(ids).logits) < 1e-5
        # and the routing matters: random routers give something else
        assert rel_err(tiny_model(state_passing="mesh")(ids).logits, base(ids).logits) > 1e-2


def reference_states(model, ids):
    """h_emb, h_pre, h0, h_1..h_K, h_out written out literally from MESH_METHOD.md sections 1-3."""
    cfg, net = model.config, model.gpt_neox
    P, C, K = cfg.num_prelude_layers, cfg.num_core_layers, cfg.num_loops
    pos = torch.arange(ids.shape[1])[None]
    rope = rotary_cos_sin(cfg, pos, torch.float32)

    def run(layer_ids, h):
        for i in layer_ids:  # attention_mask=None: sdpa falls back to is_causal
            h = net.layers[i](h, attention_mask=None, position_embeddings=rope)
        return h

    def softmax_route(router, h):
        return torch.softmax(h @ router.weight.T + router.bias, dim=-1)  # [batch, seq, B]

    h_emb = net.embed_in(ids) * cfg.embedding_multiplier
    h_pre = run(range(P), h_emb)
    is_mesh = cfg.state_passing in ("mesh", "vanilla+mesh")
    if is_mesh:
        slots = [h_emb] + [torch.zeros_like(h_emb) for _ in range(cfg.mesh_slots - 1)]
        w, r = softmax_route(net.mesh.write_routers[0], h_pre), softmax_route(net.mesh.read_routers[0], h_pre)
        slots = [m + w[..., b, None] * h_pre for b, m in enumerate(slots)]
        h0 = sum(r[..., b, None] * m for b, m in enumerate(slots))
    else:
        h0 = h_pre
    states, h = [h_emb, h_pre, h0], h0
    for t in range(K):
        first = P + (t * C if cfg.state_passing == "vanilla+mesh" else 0)
        y = run(range(first, first + C), h)
        if is_mesh:
            w = softmax_route(net.mesh.write_routers[t + 1], h)
            r = softmax_route(net.mesh.read_routers[t + 1], h)
            slots = [m + w[..., b, None] * y for b, m in enumerate(slots)]
            h = sum(r[..., b, None] * m for b, m in enumerate(slots))
        elif cfg.state_passing == "learned":
            a1, a2, a3 = net.state_scalars[t]
            h = a1 * y + a2 * h0 + a3 * h_emb
        else:
            h = {
                "base": y,
                "residual": y + h,
                "anchor": y + h0,
                "anchor_emb": y + h_emb,
                "residual+anchor": y + h + h0,
                "anchor+anchor_emb": y + h0 + h_emb,
            }[cfg.state_passing]
        states.append(h)
    states.append(run(range(len(net.layers) - cfg.num_coda_layers, len(net.layers)), h))
    return states


@pytest.mark.parametrize("variant", [v for v in STATE_PASSING_VARIANTS if v != "mor"])  # MoR: tests/unit/test_mor.py
def test_state_passing_matches_method_doc(variant):
    model = tiny_model(state_passing=variant)
    ids = random_ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        expected = reference_states(model, ids)
        assert len(out.hidden_states) == len(expected)
        for got, want in zip(out.hidden_states, expected):
            assert rel_err(got, want) < 1e-5
        assert rel_err(out.logits, model.embed_out(model.gpt_neox.final_layer_norm(expected[-1]))) < 1e-5


# -----------------------------------------------------------------------------
# 4-6: KV cache, hidden states, padding


@pytest.mark.parametrize("variant", ["base", "mesh", "learned", "vanilla+mesh"])
def test_generate_with_cache_equals_without(variant):
    model = tiny_model(state_passing=variant, initializer_range=0.2)  # peaked logits: no near-ties in argmax
    ids = random_ids(batch=1, seq=7)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=False)
    assert cached.shape == (1, 27)
    assert torch.equal(cached, uncached)


def test_hidden_states_and_cache_entries():
    model = tiny_model(state_passing="mesh", num_prelude_layers=2, num_core_layers=2, num_loops=3, num_coda_layers=1)
    cfg = model.config
    assert cfg.num_hidden_layers == 2 + 2 + 1 and len(model.gpt_neox.layers) == 5
    ids = random_ids(seq=9)
    with torch.no_grad():
        out = model(ids, use_cache=True, output_hidden_states=True)
        # h_emb, h_pre, h0, h_1..h_K, h_out
        assert len(out.hidden_states) == cfg.num_loops + 4
        assert torch.equal(out.hidden_states[0], model.gpt_neox.embed_in(ids) * cfg.embedding_multiplier)
        # one cache entry per layer application: P + C*K + Q
        assert len(out.cache.layers) == 2 + 2 * 3 + 1
        assert all(layer.get_seq_length() == 9 for layer in out.cache.layers)
        # a shared core layer keeps a separate history per loop step
        assert not torch.allclose(out.cache.layers[2].keys, out.cache.layers[4].keys)

        # continuing from the cache equals a full forward
        nxt = random_ids(seq=3, seed=2)
        step = model(nxt, cache=out.cache, use_cache=True).logits
        full = model(torch.cat([ids, nxt], dim=1)).logits[:, -3:]
        assert rel_err(step, full) < 1e-5

        base = tiny_model(state_passing="base")  # K = 2
        states = base(ids, output_hidden_states=True).hidden_states
        assert len(states) == 2 + 4 and torch.equal(states[1], states[2])  # h0 = h_pre without MeSH


def test_generate_cache_is_sized_per_application():
    # generate() builds DynamicCache(config=...) with num_hidden_layers (unique) entries; the model extends it
    model = tiny_model(state_passing="anchor", num_loops=3)
    with torch.no_grad():
        ids = random_ids(batch=1, seq=5)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert len(out.cache.layers) == model.config.num_layer_applications == 1 + 2 * 3 + 1


def test_left_padded_batch_generate_equals_single():
    model = tiny_model(state_passing="mesh", initializer_range=0.2)
    prompts = [random_ids(batch=1, seq=9, seed=3)[0], random_ids(batch=1, seq=4, seed=4)[0]]
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.full((2, width), pad)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=pad)  # 0 is also EOS
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **greedy)
        for i, p in enumerate(prompts):
            single = model.generate(p[None], **greedy)
            assert torch.equal(batched[i, width:], single[0, len(p) :])


def test_left_padded_forward_equals_unpadded():
    # no position_ids given: the model derives them from the 2-D mask
    model = tiny_model(state_passing="mesh")
    ids = random_ids(batch=1, seq=6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert rel_err(model(padded, attention_mask=mask).logits[:, 3:], model(ids).logits) < 1e-5


def test_loss_shifts_labels():
    model = tiny_model()
    ids = random_ids()
    with torch.no_grad():
        out = model(ids, labels=ids)
        manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - manual.item()) < 1e-5


def test_fresh_init():
    torch.manual_seed(0)
    model = MeshGPTNeoXForCausalLM(tiny_config(state_passing="learned"))
    assert torch.equal(model.gpt_neox.state_scalars, torch.tensor([[1.0, 1.0, 0.0]] * 2))
    assert model.embed_out.weight.data_ptr() != model.gpt_neox.embed_in.weight.data_ptr()  # untied
    layer = model.gpt_neox.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(HIDDEN))
    assert torch.equal(layer.attention.dense.bias, torch.zeros(HIDDEN))
    assert abs(layer.mlp.dense_h_to_4h.weight.std().item() - 0.02) < 2e-3

    mesh = MeshGPTNeoXForCausalLM(tiny_config(state_passing="mesh")).gpt_neox.mesh
    std = math.sqrt(2 / (5 * HIDDEN))
    weights = torch.cat([r.weight.flatten() for r in [*mesh.write_routers, *mesh.read_routers]])
    assert weights.abs().max() <= 3 * std and abs(weights.std().item() - std) < 0.15 * std
    assert all(torch.equal(r.bias, torch.zeros(5)) for r in mesh.read_routers)


def test_config_rejects_bad_layouts():
    with pytest.raises(Exception, match="core_shared"):
        MeshGPTNeoXConfig(state_passing="vanilla+mesh")
    with pytest.raises(Exception, match="state_passing"):
        MeshGPTNeoXConfig(state_passing="anchor*")
    with pytest.raises(Exception, match="mesh_slots"):
        MeshGPTNeoXConfig(state_passing="mesh", mesh_slots=1)
    with pytest.raises(Exception, match="num_hidden_layers"):
        MeshGPTNeoXConfig(num_hidden_layers=24)  # 4+8R2+4 has 16 unique layers
    assert MeshGPTNeoXConfig(state_passing="vanilla+mesh", core_shared=False).num_hidden_layers == 24


# -----------------------------------------------------------------------------
# 7: save_pretrained -> AutoModelForCausalLM with trust_remote_code


@pytest.mark.parametrize("variant", ["mesh", "learned"])
def test_save_and_load_with_remote_code(tmp_path, monkeypatch, variant):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_model(state_passing=variant)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "configuration_mesh.py").exists() and (tmp_path / "modeling_mesh.py").exists()

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mesh_gpt_neox"
    assert saved["auto_map"]["AutoConfig"] == "configuration_mesh.MeshGPTNeoXConfig"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_mesh.MeshGPTNeoXForCausalLM"
    fields = (
        "vocab_size hidden_size num_attention_heads intermediate_size hidden_act rotary_pct rotary_emb_base "
        "max_position_embeddings layer_norm_eps use_parallel_residual initializer_range tie_word_embeddings "
        "attention_bias bos_token_id eos_token_id num_prelude_layers num_core_layers num_loops num_coda_layers "
        "core_shared state_passing mesh_slots mesh_router_init mesh_router_margin embedding_multiplier "
        "num_hidden_layers"
    ).split()
    assert {f: saved.get(f) for f in fields} == {f: getattr(model.config, f) for f in fields}

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(model.state_dict())
    # 1+2R2+1 with a shared core: unique layers 0..3 only
    assert "gpt_neox.layers.3.attention.query_key_value.weight" in names and "embed_out.weight" in names
    assert not any(n.startswith("gpt_neox.layers.4.") for n in names)
    if variant == "mesh":
        assert {"gpt_neox.mesh.write_routers.2.bias", "gpt_neox.mesh.read_routers.0.weight"} <= names
    else:
        assert "gpt_neox.state_scalars" in names

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "MeshGPTNeoXForCausalLM" and type(loaded) is not MeshGPTNeoXForCausalLM
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# -----------------------------------------------------------------------------
# test-time depth: num_loops, the per-iteration KV cache, the compressed cache, the early exit

SHARED = dict(state_passing="mesh", mesh_routers="shared", mesh_step_embedding=True, mesh_slots=8,
              initializer_range=0.2)


def depth_model(kind):
    model = tiny_model(**(SHARED if kind == "mesh-shared" else dict(state_passing=kind, initializer_range=0.2)))
    if kind == "mesh-shared":
        with torch.no_grad():
            model.gpt_neox.mesh.step_embedding.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("kind", ["base", "mesh-shared"])
def test_num_loops_changes_the_output_and_k_is_the_default(kind):
    model = depth_model(kind)
    ids = random_ids()
    with torch.no_grad():
        default = model(ids).logits
        assert torch.equal(model(ids, num_loops=2).logits, default)  # K = 2
        deeper = model(ids, num_loops=6, output_hidden_states=True)
    assert rel_err(deeper.logits, default) > 1e-2
    assert len(deeper.hidden_states) == 6 + 4


@pytest.mark.parametrize("kind", ["base", "mesh-shared"])
@pytest.mark.parametrize("n", [1, 2, 6])  # 1, K, 3K
def test_cached_generation_equals_uncached_at_every_depth(kind, n):
    """The cache keeps one entry per iteration executed (P + C N + Q), so it follows N."""
    model = depth_model(kind)
    ids = random_ids(batch=1, seq=7)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True,
                             num_loops=n, return_dict_in_generate=True)
        uncached = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False,
                                  num_loops=n)
    assert torch.equal(out.sequences, uncached)
    assert len(out.cache.layers) == 1 + 2 * n + 1


def test_per_step_weights_refuse_a_deeper_forward():
    for overrides in (dict(state_passing="mesh"), dict(state_passing="learned")):
        with pytest.raises(ValueError, match="runs 1..2 iterations"):
            tiny_model(**overrides)(random_ids(), num_loops=3)
    tiny_model(state_passing="mesh")(random_ids(), num_loops=1)  # shallower: the first routers


def test_compressed_cache():
    """cache_iterations=M: P + C M + Q entries at any N, finite generation; M >= N is the full cache."""
    model = depth_model("mesh-shared")
    ids = random_ids(batch=1, seq=7)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=True, num_loops=6,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        full = model.generate(ids, **kw)
        same = model.generate(ids, cache_iterations=6, **kw)
        small = model.generate(ids, cache_iterations=2, **kw)
    assert torch.equal(same.sequences, full.sequences)
    assert len(small.cache.layers) == 1 + 2 * 2 + 1
    assert all(torch.isfinite(x).all() for x in small.logits)
    # the prompt's forward writes each reused entry once per iteration: its logits are the full cache's
    assert torch.equal(small.logits[0], full.logits[0])


def test_early_exit_threshold_zero_is_the_full_computation():
    """exit_threshold 0 never exits (KL >= 0): tokens and logits equal plain generation, through
    the probe's coda runs that overwrite their cache entries. A huge threshold exits every row
    after the second iteration: finite logits, later entries repeated (the cache keeps its
    shape). Red check: appending the probe's coda entries instead of overwriting them breaks
    the threshold-0 equality."""
    model = depth_model("mesh-shared")
    ids = random_ids(batch=2, seq=7)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True, num_loops=6,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        full = model.generate(ids, **kw)
        zero = model.generate(ids, exit_threshold=0.0, **kw)
        assert not model.gpt_neox.exit_mask.any()
        eager = model.generate(ids, exit_threshold=1e9, **kw)
        assert model.gpt_neox.exit_mask.all()
    assert torch.equal(zero.sequences, full.sequences)
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(zero.logits, full.logits))
    assert all(torch.isfinite(x).all() for x in eager.logits)
    assert all(layer.get_seq_length() == 7 + 7 for layer in eager.cache.layers)
    assert not all(torch.equal(a, b) for a, b in zip(eager.logits, full.logits))
    # an exited token's later iterations repeat its last computed entry: the 7 decoded tokens' keys
    # and values at iterations 3..6 of each core layer are iteration 2's (entry P + t C + j); the
    # prompt's forward does not exit, so there they differ
    P, C = model.config.num_prelude_layers, model.config.num_core_layers
    layers = eager.cache.layers
    for j in range(C):
        second = layers[P + C + j]
        assert not torch.equal(layers[P + j].keys[..., 7:, :], second.keys[..., 7:, :])
        for t in range(2, 6):
            later = layers[P + t * C + j]
            assert torch.equal(later.keys[..., 7:, :], second.keys[..., 7:, :]), (t, j)
            assert torch.equal(later.values[..., 7:, :], second.values[..., 7:, :]), (t, j)
            assert not torch.equal(later.keys[..., :7, :], second.keys[..., :7, :]), (t, j)
