"""Training checkpoint -> Hugging Face directory (`to_hf`).

    HF_DIR/config.json                 GPTNeoXConfig (vanilla) or MeshGPTNeoXConfig + auto_map
    HF_DIR/generation_config.json      bos / eos of the run's tokenizer
    HF_DIR/model.safetensors           weights under GPT-NeoX names (key_map.py)
    HF_DIR/configuration_mesh.py       looped variants only: the remote code,
    HF_DIR/modeling_mesh.py            loaded with trust_remote_code=True
    HF_DIR/tokenizer.model | tokenizer.json, tokenizer_config.json   (tokenizer.py)

Format decisions:
  * vocab_size is the checkpoint's PADDED row count (megatron pads to 128 * TP); the extra
    rows are never produced by the tokenizer.
  * `vanilla` is exported as transformers' own GPT-NeoX (no remote code). transformers has no
    embedding multiplier, so sqrt(hidden) (when scale_embeddings is on) is folded into
    embed_in: exact, because the embedding is a lookup whose rows are only ever used scaled.
  * every other variant keeps unscaled weights and sets `embedding_multiplier` in config.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mesh_megatron.conversion.tokenizer import TokenizerExport, export_tokenizer
from mesh_megatron.conversion.key_map import fold_embedding_multiplier, hf_config, training_to_hf
from mesh_megatron.checkpoint.reader import open_checkpoint, read_model_state, verify_checkpoint
from mesh_megatron.config import ConfigError, ModelConfig
from mesh_megatron.paths import atomic_dir, check_output_dir, check_separate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportReport:
    out_dir: str
    source: str  # CKPT/iter_XXXXXXX
    model_type: str  # "gpt_neox" | "mesh_gpt_neox"
    tensors: int
    dtype: torch.dtype
    tokenizer: Optional[TokenizerExport]


def _progress(enabled: bool, desc: str, unit: str):
    """A tqdm wrapper for an iterable, or the identity when progress bars are off."""
    def wrap(items):
        if not enabled:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit=unit)
    return wrap


def build_hf_model(config: ModelConfig, hf_state: dict, hf_cfg, where: str):
    """The HF model (GPTNeoXForCausalLM for vanilla, MeSH's class otherwise) holding
    `hf_state` (HF names; vanilla's multiplier already folded). Built on the meta device
    and assigned the tensors as they are: no second copy of the weights, no random init.
    `where` names the source in the error when the weights do not fit."""
    if config.variant == "vanilla":
        from transformers import GPTNeoXForCausalLM as model_class

        # transformers 5 names the output layer lm_head in memory; save_pretrained writes it
        # back as embed_out (Pythia's checkpoint name).
        state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in hf_state.items()}
    else:
        from mesh_megatron.hf import MeshGPTNeoXForCausalLM as model_class

        state = hf_state
    with torch.device("meta"):
        model = model_class(hf_cfg)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{where}: weights do not fit {model_class.__name__} (missing {missing[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]})")
    return model


def save_hf_model(config: ModelConfig, hf_state: dict[str, Tensor], out_dir: str, *,
                  bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
                  pad_token_id: Optional[int] = None) -> str:
    """Write `hf_state` (HF names, multiplier already folded for vanilla) with its config via
    save_pretrained. The model is built on the meta device and takes the tensors as they
    are (assign=True): no second copy of the weights, no random init. Returns model_type."""
    from transformers import GenerationConfig

    rows = hf_state["gpt_neox.embed_in.weight"].shape[0]
    dtype = hf_state["gpt_neox.embed_in.weight"].dtype
    hf_cfg = hf_config(config, rows, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, dtype=dtype)
    model = build_hf_model(config, hf_state, hf_cfg, "export")
    model.generation_config = GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                               pad_token_id=pad_token_id)
    model.save_pretrained(out_dir)
    if config.variant == "vanilla":
        # Older transformers (4.x) read GPT-NeoX's rotary settings under these names; 5.x
        # reads rope_parameters and ignores them.
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            saved = json.load(f)
        saved.update(rotary_pct=config.rotary_percent, rotary_emb_base=config.rotary_base)
        with open(path, "w") as f:
            json.dump(saved, f, indent=2, sort_keys=True)
            f.write("\n")
    return hf_cfg.model_type


def export_to_hf(load_dir: str, out_dir: str, iteration: Optional[int] = None,
                 dtype: Optional[str] = None, force: bool = False, progress: bool = True) -> ExportReport:
    """Convert one checkpoint of `load_dir` (default: `latest`) into an HF directory.

    `dtype`: "fp32" | "bf16" | "fp16", or None for the dtype the checkpoint stores.
    Refuses a non-empty `out_dir` unless `force`. The checkpoint's model files are checked
    against its manifest (SHA-256) before they are read. The export is written into a
    temporary sibling and renamed onto `out_dir` once complete (paths.atomic_dir): a bad
    input or a failed write leaves `out_dir` as it was.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is unknown: choose one of {', '.join(DTYPES)}")
    check_separate(out_dir, load_dir, "--out")
    check_output_dir(out_dir, "--out", force=force)
    ckpt = open_checkpoint(load_dir, iteration)
    verify_checkpoint(ckpt, weights_only=True)
    state = read_model_state(ckpt, progress=_progress(progress, "reading shards", "file"))

    renamed = training_to_hf(state, ckpt.model)
    del state
    if ckpt.model.variant == "vanilla":  # before any cast: one rounding, not two
        renamed = fold_embedding_multiplier(renamed, ckpt.model.embedding_multiplier)
    cast = DTYPES[dtype] if dtype else None
    hf_state = {}
    for name, tensor in _progress(progress, "converting", "tensor")(list(renamed.items())):
        hf_state[name] = (tensor.to(cast) if cast else tensor).contiguous()
    del renamed

    with atomic_dir(out_dir, "--out") as tmp:
        tok = None
        if ckpt.tokenizer_file and os.path.isfile(ckpt.tokenizer_file):
            tok = export_tokenizer(ckpt.tokenizer_type or "sentencepiece", ckpt.tokenizer_file, tmp,
                                   ckpt.model.seq_length)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if not progress:  # save_pretrained's own "Writing model shards" bar too
            hf_logging.disable_progress_bar()
        try:
            model_type = save_hf_model(ckpt.model, hf_state, tmp,
                                       bos_token_id=tok.bos_token_id if tok else None,
                                       eos_token_id=tok.eos_token_id if tok else None,
                                       pad_token_id=tok.pad_token_id if tok else None)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    return ExportReport(out_dir=out_dir, source=ckpt.path, model_type=model_type, tensors=len(hf_state),
                        dtype=hf_state["gpt_neox.embed_in.weight"].dtype, tokenizer=tok)
