"""Hugging Face directory -> weights-only training checkpoint (`from_hf`).

Two sources are accepted:

* `gpt_neox` (Pythia and any transformers GPTNeoXForCausalLM with parallel residual, exact
  GELU and biases): imported as `vanilla`, or re-laid-out as a recursive model whose compute
  depth equals the source's layer count (P + C*K + Q = N):
      prelude layer i   <- vanilla layer i                     (i < P)
      coda layer k      <- vanilla layer P + C*K + k
      core layer j      <- the middle block M = vanilla layers P .. P+C*K-1, by `init`:
          stepwise  M[j*K]                   every K-th middle layer, from the first
          average   mean_t M[t*C + j]        the K layers the unrolled loop applies as core
                                             layer j (t = 0..K-1), averaged tensor by tensor
          lower     M[j]                     the first C middle layers
      `vanilla+mesh` keeps all C*K middle layers as its K distinct blocks (no `init`).
  MeSH routers and `learned` scalars have no source: they get the training model's own fresh
  init (Router.reset_parameters, seeded by `seed`). Pythia has no embedding multiplier, so the
  written ModelConfig has scale_embeddings=False: an imported `vanilla` reproduces
  transformers' logits exactly.
* `mesh_gpt_neox` (this project's export): read back as is; an embedding_multiplier of 1 or
  sqrt(hidden) becomes scale_embeddings, any other value is folded into the embedding.

Relaxed sharing (`lora_rank`, arXiv 2410.20672): on top of the tied core, each loop position
(iteration t, core layer j, whose source is vanilla layer P + t*C + j) gets the rank-r truncated
SVD of its residual R = W_source - W_tied for every LoRA target: B = U_r S_r / s, A = V_r^T
(s = alpha / r, so s B A = U_r S_r V_r^T). `relax_biases` / `relax_norms` store the exact bias
and LayerNorm residuals as the per-position deltas. `lora_rank="full"` (r = hidden, both
relaxed) reproduces the source model up to fp32 rounding. The report gives, per residual, the
fraction of its Frobenius norm the rank keeps, ||S_r|| / ||S|| (1 for a zero residual, e.g.
stepwise's position that is its own source).

Our `stepwise` takes every K-th middle layer from the first (M[j*K]); the Mixture-of-Recursions
reference (model/sharing_strategy.py, "cycle") takes round(linspace(0, N-1, C)) over all N
layers, so its picks span the whole stack including the last layer and ignore prelude/coda;
ours stays inside the middle block the core replaces (docs/MESH_METHOD.md section 8).

The vocabulary keeps the source's row count: ModelConfig.vocab_size = rows, with
make_vocab_size_divisible_by chosen so no padding is added at the requested TP size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from mesh_megatron.conversion.key_map import (fold_embedding_multiplier, hf_to_training, scale_embeddings_for,
                                              vocab_divisor)
from mesh_megatron.checkpoint.reader import error_summary
from mesh_megatron.checkpoint.writer import MODEL_YAML, write_training_checkpoint
from mesh_megatron.paths import atomic_dir, check_output_dir, check_separate
from mesh_megatron.config import (VARIANTS, ConfigError, Layout, ModelConfig, ParallelConfig, validate)

INIT_METHODS = ("stepwise", "average", "lower")
SUPPORTED_MODEL_TYPES = ("gpt_neox", "mesh_gpt_neox")


@dataclass
class ImportReport:
    save_dir: str
    model: ModelConfig
    source_type: str
    layer_sources: list[list[int]] = field(default_factory=list)  # per unique layer: source layers
    # relaxed import: HF name of each adapter's residual at iteration t -> kept Frobenius fraction
    kept_fraction: dict[str, float] = field(default_factory=dict)
    tokenizer: Optional[tuple[str, str]] = None

    def resume_command(self) -> str:
        tok = (f" --tokenizer-type {self.tokenizer[0]} --tokenizer-model "
               f"{os.path.join(self.save_dir, 'iter_0000000', 'tokenizer', os.path.basename(self.tokenizer[1]))}"
               if self.tokenizer else " --tokenizer-type TYPE --tokenizer-model FILE")
        return (f"pretrain_mesh.py --config {os.path.join(self.save_dir, MODEL_YAML)} --load {self.save_dir} "
                f"--save NEW_DIR --data-path PREFIX{tok}")


# --------------------------------------------------------------------------------------
# Reading an HF directory
# --------------------------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """config.json as a dict; refuses a missing file or another architecture."""
    if not os.path.isdir(hf_dir):
        raise ConfigError(f"--hf {hf_dir}: no such directory; pass a Hugging Face model directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--hf {hf_dir} has no config.json: pass a Hugging Face model directory "
                          "(save_pretrained output)")
    with open(path) as f:
        data = json.load(f)
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"--hf {hf_dir} is a {model_type!r} model ({', '.join(data.get('architectures') or [])}): "
                          "only GPT-NeoX / Pythia (model_type 'gpt_neox') and this project's exports "
                          "('mesh_gpt_neox') can be imported")
    return data


def read_hf_weights(hf_dir: str) -> dict[str, Tensor]:
    """Every tensor of the directory: safetensors (single or sharded) or pytorch_model.bin."""
    def files_of(index_name: str) -> list[str]:
        with open(os.path.join(hf_dir, index_name)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))

    if os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files, kind = ["model.safetensors"], "safetensors"
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json")):
        files, kind = files_of("model.safetensors.index.json"), "safetensors"
    elif os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")):
        files, kind = ["pytorch_model.bin"], "bin"
    elif os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin.index.json")):
        files, kind = files_of("pytorch_model.bin.index.json"), "bin"
    else:
        raise ConfigError(f"--hf {hf_dir} has no weights (model.safetensors or pytorch_model.bin, "
                          "single or sharded)")
    state: dict[str, Tensor] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        try:
            if kind == "safetensors":
                from safetensors.torch import load_file

                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ConfigError(f"{path} is unreadable ({error_summary(e)}): re-download or re-save the "
                              "model") from None
    # Output layer under transformers' in-memory name, or missing when tied to the input.
    if "lm_head.weight" in state and "embed_out.weight" not in state:
        state["embed_out.weight"] = state.pop("lm_head.weight")
    return state


def find_tokenizer(hf_dir: str) -> Optional[tuple[str, str]]:
    """(type, file) of the directory's tokenizer: the sentencepiece model when there is one
    (this project's exports keep the original next to a converted tokenizer.json)."""
    for name, kind in (("tokenizer.model", "sentencepiece"), ("tokenizer.json", "hf")):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            return kind, path
    return None


# --------------------------------------------------------------------------------------
# Layer selection for the recursive re-layout
# --------------------------------------------------------------------------------------

def layer_sources(num_layers: int, config: ModelConfig, init: str) -> list[list[int]]:
    """For each unique layer of `config` (HF order: prelude, core, coda), the vanilla layers
    whose weights it takes (averaged when more than one). See the module docstring."""
    if init not in INIT_METHODS:
        raise ConfigError(f"--init {init!r} is unknown: choose one of {', '.join(INIT_METHODS)}")
    layout = config.parsed_layout
    if layout.compute_depth != num_layers:
        raise ConfigError(
            f"layout {config.layout} runs {layout.compute_depth} layers but the source has {num_layers}: "
            f"choose P+CrK+Q with P + C*K + Q = {num_layers} (e.g. "
            f"{_example_layout(num_layers)})")
    if not layout.is_looped:
        return [[i] for i in range(num_layers)]
    P, C, K, Q = layout.prelude, layout.core, layout.loops, layout.coda
    prelude = [[i] for i in range(P)]
    coda = [[P + C * K + k] for k in range(Q)]
    if not config.core_shared:  # vanilla+mesh: K distinct blocks, exactly the middle layers
        core = [[P + i] for i in range(C * K)]
    elif init == "stepwise":
        core = [[P + j * K] for j in range(C)]
    elif init == "average":
        core = [[P + t * C + j for t in range(K)] for j in range(C)]
    else:  # lower
        core = [[P + j] for j in range(C)]
    return prelude + core + coda


def _example_layout(n: int) -> str:
    q = max(1, n // 6)
    middle = n - 2 * q
    return f"{q}+{middle // 2}R2+{q + middle % 2}" if middle >= 2 else str(n)


def _mean(tensors: list[Tensor]) -> Tensor:
    if len(tensors) == 1:
        return tensors[0]
    return torch.stack([t.float() for t in tensors]).mean(dim=0)


def select_layers(state: dict[str, Tensor], sources: list[list[int]]) -> dict[str, Tensor]:
    """HF state of the re-laid-out model: unique layer u holds the mean of its source layers."""
    prefix = "gpt_neox.layers."
    per_layer: dict[int, dict[str, Tensor]] = {}
    out = {}
    for name, tensor in state.items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            per_layer.setdefault(int(index), {})[rest] = tensor
        else:
            out[name] = tensor
    for u, src in enumerate(sources):
        for rest in per_layer[src[0]]:
            out[f"{prefix}{u}.{rest}"] = _mean([per_layer[i][rest] for i in src])
    return out


# --------------------------------------------------------------------------------------
# ModelConfig of a source
# --------------------------------------------------------------------------------------

def _gpt_neox_model_config(hf_dir: str, rows: int, layout: Optional[str], variant: Optional[str],
                           mesh_slots: Optional[int], seq_length: Optional[int], tp: int,
                           relax: Optional[dict] = None) -> ModelConfig:
    from transformers import GPTNeoXConfig

    hf = GPTNeoXConfig.from_pretrained(hf_dir)
    rope = dict(hf.rope_parameters or {})
    problems = []
    if not hf.use_parallel_residual:
        problems.append("use_parallel_residual is False (the training layer is Pythia's parallel residual)")
    if hf.hidden_act != "gelu":
        problems.append(f"hidden_act is {hf.hidden_act!r} (the training layer uses exact 'gelu')")
    if not getattr(hf, "attention_bias", True):
        problems.append("attention_bias is False (the training layer has biases)")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope type {rope.get('rope_type')!r} (only plain rotary is supported)")
    if problems:
        raise ConfigError(f"--hf {hf_dir} cannot be imported: {'; '.join(problems)}")
    n = hf.num_hidden_layers
    variant = variant or "vanilla"
    if variant not in VARIANTS:
        raise ConfigError(f"--variant {variant!r} is unknown: choose one of {', '.join(VARIANTS)}")
    if variant == "vanilla":
        layout = str(Layout.parse(layout).compute_depth) if layout else str(n)
    elif not layout:
        raise ConfigError(f"--variant {variant} needs --layout P+CrK+Q with P + C*K + Q = {n} "
                          f"(the source's layers), e.g. {_example_layout(n)}")
    theta = float(rope.get("rope_theta", 10000.0))
    config = ModelConfig(
        hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        ffn_hidden_size=None if hf.intermediate_size == 4 * hf.hidden_size else hf.intermediate_size,
        layout=layout, variant=variant, mesh_slots=mesh_slots,
        vocab_size=rows, make_vocab_size_divisible_by=vocab_divisor(rows, tp),
        seq_length=seq_length or hf.max_position_embeddings,
        scale_embeddings=False,  # Pythia has no embedding multiplier
        layernorm_epsilon=hf.layer_norm_eps,
        rotary_percent=float(rope.get("partial_rotary_factor", 1.0)),
        rotary_base=int(theta) if theta.is_integer() else theta,
        hidden_dropout=float(hf.hidden_dropout), attention_dropout=float(hf.attention_dropout),
        **(relax or {}),
    )
    validate(config, ParallelConfig(tensor_model_parallel_size=tp))
    return config


_LINEARS = {"query_key_value": "attention", "dense": "attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
_NORMS = ("input_layernorm", "post_attention_layernorm")


def svd_adapters(source: dict[str, Tensor], tied: dict[str, Tensor],
                 config: ModelConfig) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per-position adapters (HF names, stacked over the K iterations) from the residuals of the
    source layers against the tied core (module docstring), and the kept fraction of each."""
    layout = config.parsed_layout
    P, C, K, r = layout.prelude, layout.core, layout.loops, config.lora_rank
    layer = "gpt_neox.layers.{}."
    out: dict[str, list[Tensor]] = {}
    kept: dict[str, float] = {}
    for j in range(C):
        core = layer.format(P + j)
        for t in range(K):
            src = layer.format(P + t * C + j)
            for name in config.lora_target_names if r else ():
                part = f"{_LINEARS[name]}.{name}."
                residual = source[src + part + "weight"].double() - tied[core + part + "weight"].double()
                u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
                total = sv.square().sum().sqrt().item()
                kept[f"{src}{part}weight"] = sv[:r].square().sum().sqrt().item() / total if total else 1.0
                out.setdefault(core + part + "lora_B", []).append(u[:, :r] * sv[:r] / config.lora_scale)
                out.setdefault(core + part + "lora_A", []).append(vh[:r])
            deltas = [f"{_LINEARS[n]}.{n}.bias" for n in _LINEARS] if config.relax_biases else []
            if config.relax_norms:
                deltas += [f"{n}.{leaf}" for n in _NORMS for leaf in ("weight", "bias")]
            for name in deltas:
                out.setdefault(f"{core}{name}_delta", []).append(source[src + name].double() - tied[core + name].double())
    return {k: torch.stack(v).float() for k, v in out.items()}, kept


def _mesh_model_config(hf_dir: str, rows: int, seq_length: Optional[int], tp: int) -> tuple[ModelConfig, float]:
    """(ModelConfig, embedding multiplier left to fold into the weights)."""
    from mesh_megatron.hf import MeshGPTNeoXConfig

    hf = MeshGPTNeoXConfig.from_pretrained(hf_dir)
    scale = scale_embeddings_for(float(hf.embedding_multiplier), hf.hidden_size)
    config = ModelConfig(
        hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        ffn_hidden_size=None if hf.intermediate_size == 4 * hf.hidden_size else hf.intermediate_size,
        layout=f"{hf.num_prelude_layers}+{hf.num_core_layers}R{hf.num_loops}+{hf.num_coda_layers}",
        variant=hf.state_passing,
        mesh_slots=hf.mesh_slots if hf.state_passing in ("mesh", "vanilla+mesh") else None,
        mesh_router_init=getattr(hf, "mesh_router_init", "paper"),
        mesh_router_margin=getattr(hf, "mesh_router_margin", None),
        lora_rank=getattr(hf, "lora_rank", 0), lora_alpha=getattr(hf, "lora_alpha", None),
        lora_targets=getattr(hf, "lora_targets", ModelConfig.lora_targets),
        relax_biases=getattr(hf, "relax_biases", False), relax_norms=getattr(hf, "relax_norms", False),
        mesh_routers=getattr(hf, "mesh_routers", "per-step"),
        mesh_step_embedding=getattr(hf, "mesh_step_embedding", False),
        input_injection=getattr(hf, "input_injection", "none"),
        state_init=getattr(hf, "state_init", "prelude"),
        **(dict(mor_routing=hf.mor_routing, mor_alpha=float(hf.mor_alpha), mor_kv=hf.mor_kv,
                mor_bias_rate=getattr(hf, "mor_bias_rate", None),
                mor_capacities=",".join(repr(float(c)) for c in hf.mor_capacities) if hf.mor_capacities else None)
           if hf.state_passing == "mor" else {}),
        vocab_size=rows, make_vocab_size_divisible_by=vocab_divisor(rows, tp),
        seq_length=seq_length or hf.max_position_embeddings,
        scale_embeddings=bool(scale), layernorm_epsilon=hf.layer_norm_eps,
        rotary_percent=float(hf.rotary_pct),
        rotary_base=int(hf.rotary_emb_base) if float(hf.rotary_emb_base).is_integer() else hf.rotary_emb_base,
    )
    validate(config, ParallelConfig(tensor_model_parallel_size=tp))
    return config, (1.0 if scale is not None else float(hf.embedding_multiplier))


def _fresh_state_passing(config: ModelConfig, seed: int) -> dict[str, Tensor]:
    """Routers / learned scalars with the training model's own init, seeded, without touching
    the caller's random state."""
    from mesh_megatron.model.state_passing import build_state_passing

    if not config.parsed_layout.is_looped:
        return {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_state_passing(config)
    return {f"block.state_passing.{k}": v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------

def import_from_hf(hf_dir: str, save_dir: str, *, layout: Optional[str] = None, variant: Optional[str] = None,
                   init: str = "stepwise", mesh_slots: Optional[int] = None, seq_length: Optional[int] = None,
                   tensor_parallel_size: int = 1, seed: int = 1234, force: bool = False,
                   lora_rank=0, lora_alpha: Optional[float] = None, lora_targets: Optional[str] = None,
                   relax_biases: bool = False, relax_norms: bool = False) -> ImportReport:
    """Write `hf_dir` as iteration 0 (weights only) of a training checkpoint in `save_dir`.

    Every check runs before anything is written; a non-empty `save_dir` is refused unless
    `force`. Weights are stored in fp32 (the training master dtype). `lora_rank` (an int or
    "full") and the other relaxation options build SVD-initialised adapters (module docstring).
    """
    data = read_hf_config(hf_dir)
    if init not in INIT_METHODS:
        raise ConfigError(f"--init {init!r} is unknown: choose one of {', '.join(INIT_METHODS)}")
    check_separate(save_dir, hf_dir, "--save")
    check_output_dir(save_dir, "--save", force=force)
    hf_state = read_hf_weights(hf_dir)
    if "gpt_neox.embed_in.weight" not in hf_state:
        raise ConfigError(f"--hf {hf_dir}: no gpt_neox.embed_in.weight among its tensors: not a GPT-NeoX "
                          "checkpoint")
    if "embed_out.weight" not in hf_state:  # tie_word_embeddings: the output is the input matrix
        hf_state["embed_out.weight"] = hf_state["gpt_neox.embed_in.weight"]
    hf_state = {k: v.float() for k, v in hf_state.items()}
    rows = hf_state["gpt_neox.embed_in.weight"].shape[0]

    sources: list[list[int]] = []
    kept: dict[str, float] = {}
    relax = {k: v for k, v in dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                                   relax_biases=relax_biases, relax_norms=relax_norms).items() if v}
    if data["model_type"] == "mesh_gpt_neox":
        if relax:
            raise ConfigError(f"--hf {hf_dir} is a MeSH export: its adapters (if any) come with it; drop "
                              "--lora-rank/--lora-alpha/--lora-targets/--relax-biases/--relax-norms")
        if layout or variant or mesh_slots is not None:
            raise ConfigError(f"--hf {hf_dir} is already a recursive MeSH export ({data.get('state_passing')}, "
                              "layout from its config): drop --layout/--variant/--mesh-slots; re-laying out a "
                              "looped model is not supported")
        config, fold = _mesh_model_config(hf_dir, rows, seq_length, tensor_parallel_size)
        hf_state = fold_embedding_multiplier(hf_state, fold)
    else:
        config = _gpt_neox_model_config(hf_dir, rows, layout, variant, mesh_slots, seq_length,
                                        tensor_parallel_size, relax)
        n = sum(1 for k in hf_state if k.startswith("gpt_neox.layers.") and k.endswith(".input_layernorm.weight"))
        sources = layer_sources(n, config, init)
        tied = select_layers(hf_state, sources)
        if config.is_relaxed:
            adapters, kept = svd_adapters(hf_state, tied, config)
            tied.update(adapters)
        hf_state = tied
    state = hf_to_training(hf_state, config)
    fresh = {k: v for k, v in _fresh_state_passing(config, seed).items() if k not in state}  # routers, scalars
    state.update(fresh)

    tokenizer = find_tokenizer(hf_dir)
    with atomic_dir(save_dir, "--save") as tmp:
        write_training_checkpoint(
            tmp, config, state, tensor_parallel_size=tensor_parallel_size, tokenizer=tokenizer,
            source={"hf_dir": os.path.abspath(hf_dir), "model_type": data["model_type"],
                    "init": init if sources and config.core_shared and config.parsed_layout.is_looped else None,
                    "layer_sources": sources, "seed": seed,
                    **({"kept_fraction": kept} if kept else {})})
    return ImportReport(save_dir=save_dir, model=config, source_type=data["model_type"], layer_sources=sources,
                        tokenizer=tokenizer, kept_fraction=kept)
