"""Presets, exact parameter counts (meta device) and the validation messages."""

import json

import pytest
import torch

from launch import run_script
from mesh_megatron.config import (ConfigError, Layout, ModelConfig, ParallelConfig, preset,
                                  to_transformer_config, validate)
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.model.accounting import ParameterCounts, training_flops_per_token

# docs/MESH_METHOD.md section 4: non-embedding parameters, to the parameter.
TABLE = [
    ("pythia-160m", "vanilla", None, 85_056_000),
    ("pythia-160m", "base", "2+4R2+2", 56_704_512),
    ("pythia-410m", "vanilla", None, 302_311_424),
    ("pythia-410m", "base", "4+8R2+4", 201_541_632),
    ("pythia-410m", "base", "3+6R3+3", 151_156_736),
    ("pythia-1b", "vanilla", None, 805_736_448),
    ("pythia-1b", "base", "3+5R2+3", 553_945_088),
    ("pythia-1.4b", "vanilla", None, 1_208_602_624),
    ("pythia-1.4b", "base", "4+8R2+4", 805_736_448),
    ("pythia-1.4b", "mesh", "4+8R2+4", 805_797_918),
]


def meta_counts(cfg: ModelConfig) -> ParameterCounts:
    with torch.device("meta"):
        model = MeshGPTModel(cfg, to_transformer_config(cfg, perform_initialization=False))
    return ParameterCounts.of(model)


@pytest.mark.parametrize("name,variant,layout,expected", TABLE)
def test_non_embedding_counts_match_paper(megatron_single, name, variant, layout, expected):
    cfg = preset(name, variant, layout)
    validate(cfg)
    assert meta_counts(cfg).non_embedding == expected


@pytest.mark.parametrize("name", ["pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b"])
@pytest.mark.parametrize("variant", ["residual", "anchor", "anchor_emb", "mesh", "residual+anchor",
                                     "anchor+anchor_emb", "learned", "vanilla+mesh"])
def test_every_variant_of_every_preset_is_consistent(megatron_single, name, variant):
    """Additive variants add nothing; MeSH adds exactly (K+1)*2*(hB+B); learned adds 3K;
    vanilla+mesh is the vanilla stack plus routers."""
    cfg = preset(name, variant)
    validate(cfg)
    counts = meta_counts(cfg)
    layout = cfg.parsed_layout
    h = cfg.hidden_size
    looped_base = meta_counts(preset(name, "base")).non_embedding
    if variant == "mesh":
        assert counts.router == (layout.loops + 1) * 2 * (h * cfg.slots + cfg.slots)
        assert counts.non_embedding == looped_base + counts.router
    elif variant == "vanilla+mesh":
        vanilla = meta_counts(preset(name, "vanilla")).non_embedding
        assert counts.non_embedding == vanilla + counts.router > vanilla
    elif variant == "learned":
        assert counts.non_embedding == looped_base + 3 * layout.loops
    else:
        assert counts.non_embedding == looped_base and counts.router == 0


def test_mesh_router_overhead_1p4b(megatron_single):
    counts = meta_counts(preset("pythia-1.4b", "mesh"))
    assert counts.router == 61_470
    assert counts.embedding == 2 * 50_304 * 2048  # untied input and output embeddings


def test_flops_count_every_iteration():
    base = preset("pythia-1.4b", "base")
    vanilla = preset("pythia-1.4b", "vanilla")
    mesh = preset("pythia-1.4b", "mesh")
    # Matched compute: 4+8R2+4 runs 24 layers like the 24-layer vanilla model.
    assert training_flops_per_token(base) == training_flops_per_token(vanilla)
    h, seq, L, V = 2048, 4096, 24, 50_304
    assert training_flops_per_token(base) == 6 * (L * 12 * h * h + h * V) + 12 * L * h * seq
    assert training_flops_per_token(mesh) - training_flops_per_token(base) == 6 * 3 * 2 * h * 5


def test_summary_tool_json():
    out = run_script("tools/model_summary.py", ["--preset", "pythia-1.4b", "--variant", "mesh", "--json"])
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["non_embedding"] == 805_797_918 and summary["router"] == 61_470
    assert summary["compute_depth"] == 24 and summary["unique_depth"] == 16
    assert {"total", "embedding", "flops_per_token"} <= summary.keys()


def test_layout_parse_and_depths():
    assert Layout.parse("4+8R2+4") == Layout(4, 8, 2, 4)
    assert Layout.parse("3+6r3+3").compute_depth == 24
    cfg = preset("pythia-410m", "mesh", "3+6R3+3")
    assert (cfg.compute_depth, cfg.unique_depth, cfg.slots) == (24, 12, 6)
    assert preset("pythia-1.4b", "vanilla", "4+8R2+4").layout == "24"


@pytest.mark.parametrize("change,parallel,message", [
    (dict(layout="4+8x2+4"), None, "layout '4+8x2+4' is malformed"),
    (dict(hidden_size=64, num_attention_heads=5), None, "num_attention_heads=5 does not divide hidden_size=64"),
    (dict(num_attention_heads=4), ParallelConfig(tensor_model_parallel_size=3),
     "tensor_model_parallel_size=3 does not divide num_attention_heads=4"),
    (dict(mesh_slots=1), None, "mesh_slots=1 is too small"),
    (dict(variant="anchorr"), None, "variant 'anchorr' is unknown"),
    (dict(variant="vanilla", layout="6", mesh_slots=5), None, "mesh_slots is set but variant is 'vanilla'"),
    (dict(variant="anchor", mesh_slots=5), None, "has no MeSH buffer"),
    (dict(variant="mesh", layout="6"), None, "needs a looped layout"),
    (dict(mesh_router_init="uniform"), None, "mesh_router_init 'uniform' is unknown: choose one of paper, base"),
    (dict(variant="anchor", mesh_router_init="base"), None, "variant 'anchor' has no MeSH routers"),
    (dict(mesh_router_margin=2.0), None, "mesh_router_margin is set but mesh_router_init is 'paper'"),
    (dict(mesh_router_init="base", mesh_router_margin=0.0), None, "mesh_router_margin=0.0 must be positive"),
    (dict(mesh_router_init="base", mesh_slots=3), None, "needs mesh_slots >= K + 2 = 4"),
])
def test_bad_config_has_one_clear_message(change, parallel, message):
    cfg = ModelConfig(**{**ModelConfig().__dict__, **change})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        validate(cfg, parallel)


def test_unknown_preset_names_choices():
    with pytest.raises(ConfigError, match="preset 'pythia-7b' is unknown: choose one of tiny"):
        preset("pythia-7b")


@pytest.mark.parametrize("rank,targets,per_position", [
    (8, None, 1_048_576),  # 8 core layers x r 8 x (4h + 2h + 2 (h + 4h)) = 64 x 16,384
    (32, None, 4_194_304),
    ("full", None, 134_217_728),  # r = h = 1024
    (8, "dense,dense_4h_to_h", 8 * 8 * (2 * 1024 + 5 * 1024)),
])
def test_relaxed_counts_and_flops_match_the_formula(megatron_single, rank, targets, per_position):
    """Adapters of pythia-410m base 4+8R2+4 (K = 2 loop positions), counted from the built model."""
    from mesh_megatron.model.accounting import adapter_params, adapter_params_per_position, delta_params

    cfg = preset("pythia-410m", "base", "4+8R2+4", lora_rank=rank,
                 **({"lora_targets": targets} if targets else {}))
    validate(cfg)
    counts, plain = meta_counts(cfg), meta_counts(preset("pythia-410m", "base", "4+8R2+4"))
    assert adapter_params_per_position(cfg) == per_position
    assert counts.adapter == adapter_params(cfg) == 2 * per_position
    # full rank also relaxes biases (5h + ffn) and norms (4h) of each of the 16 positions
    assert counts.delta == delta_params(cfg) == (16 * (5 * 1024 + 4096 + 4 * 1024) if rank == "full" else 0)
    assert counts.total == plain.total + counts.adapter + counts.delta
    # each position's adapter is applied once per token: 6 FLOPs per adapter parameter
    assert training_flops_per_token(cfg) - training_flops_per_token(preset("pythia-410m", "base", "4+8R2+4")) \
        == 6 * counts.adapter
