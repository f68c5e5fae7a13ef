"""The probe: a model's states on held-out sequences -> the paper's diagnostics (probe.json).

    model    a training checkpoint (any TP/PP/ZeRO: shards merged by checkpoint/reader.py)
             or a Hugging Face directory (this project's export, or a GPT-NeoX / Pythia one);
             both run as the Hugging Face model (hf/modeling_mesh.py, or transformers'
             GPT-NeoX for vanilla) in fp32, on CPU or CUDA
    data     N samples of the validation split of megatron-core GPTDatasets, as training
             draws them (same split and seed): the embedded corpus unless --data-path
    states   h_emb, h0, h_1 .. h_K, h_out per sequence (analysis/states.py)
    metrics  per sequence, then mean (and std) over the N sequences (analysis/metrics.py):
             relative update of each block, RBF-CKA between all states, the normalised
             top-50 singular values of each state; MeSH: mean router weights per step/slot

probe.json keys: `states` (the order of every list below), `relative_update`, `cka`,
`spectrum`, `state_rms` (the RMS of each state over a sequence's tokens and channels, mean and
std over sequences: how the state's magnitude changes along the loop), `routers` (null
without MeSH), and `model`, `data`, `settings` describing the run. `--init-only` probes the
initialisation of a run (iteration 0) instead of a saved model.
"""

from __future__ import annotations

import filecmp
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from mesh_megatron.analysis import metrics
from mesh_megatron.analysis.states import StateReader
from mesh_megatron.config import ConfigError

PROBE_FILE = "probe.json"
# Metric chunks keep b * s * s float64 kernel entries under this (128 MiB per kernel).
_KERNEL_ENTRIES = 1 << 24


@dataclass
class ProbeSettings:
    samples: int = 64
    seq_length: Optional[int] = None  # None: the model's training sequence length
    batch_size: int = 8
    device: Optional[str] = None  # None: cuda when available, else cpu
    data_path: Optional[Sequence[str]] = None  # None: the embedded corpus
    split: str = "969,30,1"
    seed: int = 1234  # training's default: the same validation samples its log reports
    iteration: Optional[int] = None  # training checkpoints: None = latest
    vanilla_layout: Optional[str] = None  # vanilla: group layers as this P+CrK+Q
    spectrum_top: int = 50
    cka_scale: float = 1.0  # sigma = cka_scale x median pairwise token distance
    cache_dir: Optional[str] = None
    init_flags: Optional[Sequence[str]] = None  # probe the initialisation of this pretrain_mesh.py run
    num_loops: Optional[int] = None  # run the loop N times (test-time depth); None: the trained K


@dataclass
class ProbedModel:
    """A model ready to probe, and where it came from."""

    model: nn.Module  # Hugging Face causal LM, fp32, eval
    source: str
    seq_length: int  # the length it was trained on
    vocab_rows: int
    tokenizer: Optional[tuple[str, str]]  # (type, file)
    iteration: Optional[int]


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def _hf_model_of_training_checkpoint(load_dir: str, iteration: Optional[int]) -> ProbedModel:
    """The exporter's conversion (conversion/to_hf.py), kept in memory: merged TP/PP
    shards -> GPT-NeoX names -> the Hugging Face model, weights taken as they are."""
    from mesh_megatron.checkpoint.reader import open_checkpoint, read_model_state, verify_checkpoint

    ckpt = open_checkpoint(load_dir, iteration)
    verify_checkpoint(ckpt, weights_only=True)  # SHA-256 of what is read, as resume does
    tokenizer = ((ckpt.tokenizer_type or "sentencepiece", ckpt.tokenizer_file)
                 if ckpt.tokenizer_file and os.path.isfile(ckpt.tokenizer_file) else None)
    return _hf_model_of_state(ckpt.model, read_model_state(ckpt, dtype=torch.float32), ckpt.path, tokenizer,
                              ckpt.iteration)


def _hf_model_of_state(model_config, state: dict[str, Tensor], source: str, tokenizer, iteration) -> ProbedModel:
    """Training weights (full names, fp32) -> the Hugging Face model the probe runs."""
    from mesh_megatron.conversion.to_hf import build_hf_model
    from mesh_megatron.conversion.key_map import fold_embedding_multiplier, hf_config, training_to_hf

    state = training_to_hf(state, model_config)
    vanilla = model_config.variant == "vanilla"
    if vanilla:
        state = fold_embedding_multiplier(state, model_config.embedding_multiplier)
    rows = state["gpt_neox.embed_in.weight"].shape[0]
    config = hf_config(model_config, rows, dtype=torch.float32)
    model = build_hf_model(model_config, state, config, source)  # no random init: all from the weights
    if vanilla:  # transformers' rotary tables are buffers, still on the meta device
        rotary = model.gpt_neox.rotary_emb
        model.gpt_neox.rotary_emb = type(rotary)(config=config)
    return ProbedModel(model.float().eval(), source, model_config.seq_length, rows, tokenizer, iteration)


def model_at_init(run_flags: Sequence[str]) -> ProbedModel:
    """The model a `pretrain_mesh.py RUN_FLAGS` run starts from (iteration 0): the same
    per-name init (model/initialization.py, the run's --seed), built in this process at TP=1."""
    from mesh_megatron.checkpoint.skeleton import is_ignored
    from mesh_megatron.config import ExecutionConfig, ParallelConfig, to_transformer_config
    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.parallel.initialize import initialize_distributed
    from mesh_megatron.training.arguments import initial_model, tokenizer_source

    config, seed, data = initial_model(list(run_flags))
    initialize_distributed(ParallelConfig())  # no-op when this process already has groups
    model = MeshGPTModel(config, to_transformer_config(config), execution=ExecutionConfig(attention_backend="sdpa"),
                         init_seed=seed)
    state = {k: v.detach().float() for k, v in model.state_dict().items() if not is_ignored(k)}
    return _hf_model_of_state(config, state, "initialisation of: pretrain_mesh.py " + " ".join(run_flags),
                              tokenizer_source(data), 0)


def load_model(path: str, iteration: Optional[int] = None) -> ProbedModel:
    """A training checkpoint directory (holds `latest`) or a Hugging Face directory
    (holds config.json), as an fp32 Hugging Face model on the CPU."""
    from mesh_megatron.checkpoint.manager import LATEST

    from mesh_megatron.paths import check_hf_dir, check_input_dir

    fix = "pass a checkpoint directory (pretrain_mesh.py --save) or a Hugging Face directory (tools/convert_to_hf.py --out)"
    check_input_dir(path, "--load", fix)
    config_path = os.path.join(path, "config.json")
    if not os.path.lexists(config_path):
        if not os.path.exists(os.path.join(path, LATEST)):
            raise ConfigError(f"--load {path} holds neither a training checkpoint ('{LATEST}' + iter_*/) nor a "
                              "Hugging Face model (config.json): pass the --save directory of a run that saved, "
                              "or a tools/convert_to_hf.py --out directory")
        return _hf_model_of_training_checkpoint(path, iteration)
    if iteration is not None:
        raise ConfigError(f"--iteration applies to training checkpoints; {path} is a Hugging Face directory")
    from transformers import AutoModelForCausalLM

    from mesh_megatron.conversion.from_hf import find_tokenizer

    config = check_hf_dir(path, "--load", fix)  # config.json parses, weights files whole
    if config.get("model_type") not in ("gpt_neox", "mesh_gpt_neox"):
        raise ConfigError(f"--load {path} is a {config.get('model_type')!r} model: the probe reads GPT-NeoX / "
                          "Pythia models and this project's exports (mesh_gpt_neox)")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return ProbedModel(model.eval(), path, int(config.get("max_position_embeddings") or 2048),
                       int(config["vocab_size"]), find_tokenizer(path), None)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


def held_out_tokens(probed: ProbedModel, settings: ProbeSettings, seq_length: int) -> tuple[Tensor, str]:
    """[samples, seq_length] token ids of the validation split, and a description."""
    from mesh_megatron.data.datasets import build_gpt_datasets
    from mesh_megatron.data.embedded import (EMBEDDED_TOKENIZER_MODEL, embedded_tokenizer,
                                             prepare_embedded_dataset)
    from mesh_megatron.data.sampler import collate
    from mesh_megatron.data.tokenizer import build_tokenizer

    if settings.data_path:
        if probed.tokenizer is None:
            raise ConfigError(f"{probed.source} holds no tokenizer, which --data-path needs (end-of-document "
                              "id, vocabulary check): load a checkpoint saved with its tokenizer")
        paths = list(settings.data_path)
        try:
            tokenizer = build_tokenizer(*probed.tokenizer)
        except (ValueError, OSError) as e:
            raise ConfigError(str(e)) from None
        described = " ".join(paths)
    else:
        kind, file = probed.tokenizer or ("sentencepiece", str(EMBEDDED_TOKENIZER_MODEL))
        if kind != "sentencepiece" or not filecmp.cmp(file, EMBEDDED_TOKENIZER_MODEL, shallow=False):
            raise ConfigError(f"{probed.source} was trained with another tokenizer ({file}) than the embedded "
                              "corpus: pass --data-path PREFIX of data tokenized with it")
        paths = [prepare_embedded_dataset(settings.cache_dir)]
        tokenizer = embedded_tokenizer()
        described = "embedded corpus"
    try:
        built = build_gpt_datasets(paths, settings.split, seq_length, settings.seed, train_samples=1,
                                   valid_samples=settings.samples, tokenizer=tokenizer,
                                   cache_dir=settings.cache_dir, padded_vocab_size=probed.vocab_rows)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if built.valid is None:
        raise ConfigError(f"split {settings.split!r} gives the validation split no documents: pass a --split "
                          "with a validation share")
    tokens, _, _ = collate(built.valid, [i % len(built.valid) for i in range(settings.samples)])
    return tokens, f"{described}, validation split of {settings.split}"


# --------------------------------------------------------------------------------------
# the probe
# --------------------------------------------------------------------------------------


def check_settings(settings: ProbeSettings) -> str:
    """Cheap checks before any loading; returns the device."""
    for name in ("samples", "batch_size", "spectrum_top"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    if settings.seq_length is not None and settings.seq_length < 2:
        raise ConfigError(f"--seq-length must be >= 2 (the CKA kernel compares tokens), got {settings.seq_length}")
    if not settings.cka_scale > 0:
        raise ConfigError(f"the CKA bandwidth scale must be positive, got {settings.cka_scale}")
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no GPU: use --device cpu")
    return device


class _Accumulator:
    """Per-sequence metrics of every batch, reduced to mean/std at the end."""

    def __init__(self, reader: StateReader, settings: ProbeSettings):
        self.reader, self.settings = reader, settings
        index = {name: i for i, name in enumerate(reader.names)}
        self.block_pairs = [(index[a], index[b]) for _, a, b in reader.blocks]
        self.updates: list[Tensor] = []  # [b, blocks]
        self.cka: list[Tensor] = []  # [b, n, n]
        self.spectra: list[Tensor] = []  # [b, n, top]
        self.rms: list[Tensor] = []  # [b, n]
        steps = len(reader.router_steps)
        self.write_sum = torch.zeros(steps, reader.slots, dtype=torch.float64)
        self.read_sum = torch.zeros(steps, reader.slots, dtype=torch.float64)
        self.router_tokens = 0
        # MoR per recursion: [processed, active, tokens, threshold-passing active, agreeing active] and a
        # 10-bin histogram of sigmoid(router logit) over the active tokens
        self.mor_counts = None
        self.mor_hist = None
        # token-choice MoR: tokens per chosen depth [K], summed router probabilities [K], and a 10-bin
        # histogram of the chosen depth's probability p_d (the gate is alpha * p_d)
        self.depth_counts = None
        self.depth_prob_sum = None
        self.depth_hist = None

    def add(self, capture) -> None:
        states = [x.float() for x in capture.states]  # [b, s, h] each
        b, s = states[0].shape[:2]
        # RMS over the sequence's tokens and channels: sqrt(mean_{s,h} x^2), float64
        self.rms.append(torch.stack([x.double().pow(2).mean(dim=(1, 2)).sqrt() for x in states], dim=-1).cpu())
        chunk = max(1, _KERNEL_ENTRIES // (s * s))
        for lo in range(0, b, chunk):
            part = [x[lo:lo + chunk] for x in states]
            self.updates.append(torch.stack([metrics.relative_update(part[i], part[j])
                                             for i, j in self.block_pairs], dim=-1).cpu())
            self.cka.append(metrics.cka_matrix(part, self.settings.cka_scale).cpu())
            self.spectra.append(torch.stack([metrics.normalized_spectrum(x, self.settings.spectrum_top)
                                             for x in part], dim=1).cpu())
        if capture.mor:
            counts, hist = [], []
            for logits, kept, active in capture.mor:
                score = torch.sigmoid(logits.double()).cpu()
                kept, active = kept.cpu(), active.cpu()
                passing = (score > 0.5) & active
                counts.append([kept.sum(), active.sum(), kept.numel(), passing.sum(), ((passing == kept) & active).sum()])
                hist.append(torch.histc(score[active], bins=10, min=0.0, max=1.0))
            counts, hist = torch.tensor(counts, dtype=torch.float64), torch.stack(hist).double()
            self.mor_counts = counts if self.mor_counts is None else self.mor_counts + counts
            self.mor_hist = hist if self.mor_hist is None else self.mor_hist + hist
        if capture.mor_depth:
            depth, probs = (x.cpu() for x in capture.mor_depth)
            K = probs.shape[-1]
            counts = torch.bincount(depth.flatten(), minlength=K).double()
            prob_sum = probs.double().flatten(0, 1).sum(0)
            hist = torch.histc(probs.double().gather(-1, depth[..., None]).flatten(), bins=10, min=0.0, max=1.0)
            if self.depth_counts is None:
                self.depth_counts, self.depth_prob_sum, self.depth_hist = counts, prob_sum, hist
            else:
                self.depth_counts += counts
                self.depth_prob_sum += prob_sum
                self.depth_hist += hist
        if capture.write:
            # router outputs [b, s, B] per step -> summed over tokens
            self.write_sum += torch.stack([w.double().sum(dim=(0, 1)).cpu() for w in capture.write])
            self.read_sum += torch.stack([r.double().sum(dim=(0, 1)).cpu() for r in capture.read])
            self.router_tokens += b * s

    def result(self) -> dict[str, Any]:
        updates, cka, spectra = torch.cat(self.updates), torch.cat(self.cka), torch.cat(self.spectra)
        rms = torch.cat(self.rms)
        reader = self.reader
        std = (lambda x: x.std(dim=0, correction=1)) if updates.shape[0] > 1 else (lambda x: torch.zeros_like(x[0]))
        routers = None
        if reader.router_steps:
            routers = {"steps": reader.router_steps, "slots": reader.slots,
                       "write": (self.write_sum / self.router_tokens).tolist(),
                       "read": (self.read_sum / self.router_tokens).tolist(),
                       "tokens": self.router_tokens}
        return {
            "states": reader.names,
            "relative_update": [{"block": name, "from": a, "to": b, "mean": float(m), "std": float(d)}
                                for (name, a, b), m, d in zip(reader.blocks, updates.mean(0), std(updates))],
            "cka": cka.mean(0).tolist(),
            "cka_std": std(cka).tolist(),
            "spectrum": spectra.mean(0).tolist(),
            "state_rms": [{"state": name, "mean": float(m), "std": float(d)}
                          for name, m, d in zip(reader.names, rms.mean(0), std(rms))],
            "routers": routers,
            "mor": self._mor(),
        }

    def _mor(self):
        """Per recursion: fraction of all tokens processed (training's top-k), fraction of the active ones
        whose score passes 0.5 (what causal generation would process) and agreement of the two, and the
        distribution of the router score sigmoid(logit) over the active tokens (10 bins over [0, 1])."""
        if self.depth_counts is not None:  # token choice: recursion r processes the tokens of depth >= r
            tokens = self.depth_counts.sum()
            share = self.depth_counts / tokens
            return {"routing": "token-choice", "recursions": [f"loop {t}" for t in range(1, len(share) + 1)],
                    "kept_fraction": share.flip(0).cumsum(0).flip(0).tolist(), "depth_fraction": share.tolist(),
                    "mean_probability": (self.depth_prob_sum / tokens).tolist(),
                    "chosen_probability_histogram": (self.depth_hist / self.depth_hist.sum()).tolist()}
        if self.mor_counts is None:
            return None
        kept, active, tokens, passing, agree = self.mor_counts.unbind(-1)
        return {"routing": "expert-choice", "recursions": [f"loop {t}" for t in range(1, len(kept) + 1)],
                "kept_fraction": (kept / tokens).tolist(), "active_fraction": (active / tokens).tolist(),
                "threshold_fraction": (passing / active).tolist(), "agreement": (agree / active).tolist(),
                "score_histogram": (self.mor_hist / self.mor_hist.sum(-1, keepdim=True)).tolist()}


@torch.no_grad()
def run_probe(load: Optional[str], settings: Optional[ProbeSettings] = None) -> dict[str, Any]:
    """The probe.json content for the model at `load` (or, with settings.init_flags, at init)."""
    settings = settings or ProbeSettings()
    device = check_settings(settings)
    if settings.init_flags is not None:
        if settings.iteration is not None:
            raise ConfigError("--iteration and --init-only exclude each other: --init-only probes iteration 0 "
                              "of the run its flags describe")
        probed = model_at_init(settings.init_flags)
    else:
        probed = load_model(load, settings.iteration)
    seq_length = settings.seq_length or probed.seq_length
    if seq_length > probed.seq_length:
        raise ConfigError(f"--seq-length {seq_length} is longer than the {probed.seq_length} tokens the model "
                          f"was trained on: pass at most {probed.seq_length}")
    reader = StateReader(probed.model, settings.vanilla_layout, settings.num_loops)
    tokens, data = held_out_tokens(probed, settings, seq_length)
    model = probed.model.to(device)
    acc = _Accumulator(reader, settings)
    for lo in range(0, tokens.shape[0], settings.batch_size):
        acc.add(reader(tokens[lo:lo + settings.batch_size].to(device)))
    result = acc.result()
    cfg = model.config
    result["model"] = {"source": probed.source, "iteration": probed.iteration,
                       "variant": reader.variant, "layout": reader.layout, "hidden_size": cfg.hidden_size,
                       "mesh_slots": reader.slots or None,
                       **({"trained_num_loops": cfg.num_loops} if settings.num_loops is not None else {})}
    result["data"] = {"source": data, "samples": int(tokens.shape[0]), "seq_length": seq_length,
                      "seed": settings.seed}
    result["settings"] = {"device": device, "dtype": "float32 model, float64 metrics",
                          "cka_kernel": "rbf", "cka_bandwidth": metrics.BANDWIDTH_RULE,
                          "cka_bandwidth_scale": settings.cka_scale, "spectrum_top": settings.spectrum_top,
                          "vanilla_layout": settings.vanilla_layout,
                          "relative_update": "2 |f(h) - h|_F / (|f(h)|_F + |h|_F) per sequence",
                          "average": "mean over sequences (std: over sequences)"}
    return result


def write_probe(result: dict[str, Any], out_dir: str, flag: str = "--out") -> list[str]:
    """probe.json and the plots, written into a temporary sibling of `out_dir` and renamed
    onto it once all are complete (paths.atomic_dir). Returns the paths as they end up."""
    from mesh_megatron.analysis.plots import write_plots
    from mesh_megatron.paths import atomic_dir

    with atomic_dir(out_dir, flag) as tmp:
        with open(os.path.join(tmp, PROBE_FILE), "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        written = [os.path.join(tmp, PROBE_FILE), *write_plots(result, tmp)]
    return [os.path.join(out_dir, os.path.relpath(p, tmp)) for p in written]
