#!/usr/bin/env python
"""Training throughput of the trainer's real step, per state-passing variant (and Hugging Face GPTNeoX).

One process, one device (DeepSpeed's accelerator). Every row is a step a user would run:
the run is parsed from pretrain_mesh.py's flags (training/arguments.py), the model, AdamW,
LR schedule and DeepSpeed engine are built by the trainer (training/trainer.py Trainer,
build_engine), and what is timed is the trainer's step strategy (training/steps.py
PlainStep: forward and backward per micro-batch through the engine, DeepSpeed's
accumulation, ZeRO reduction, clipping, bf16/fp32 master weights and AdamW at the
boundary, the step's one host sync). The ds_config (`--ds_config`, `--zero-stage`),
precision (`--bf16`, or the ds_config's) and accumulation count (`--grad-accum N`) are
those of the run; the header names the gradient accumulation dtype DeepSpeed uses.

Variants are timed in alternating rounds (one optimizer step of each in turn) so drift
(clocks, thermal, other load) hits them alike; the step time is the median of the timed steps
after warm-up. When all variants do not fit in memory at once (GPU, big presets) each is
built, measured and freed in turn. The batches are the same random tokens for every row;
the vocabulary is the preset's (50,304 padded for Pythia), not the embedded tokenizer's.

Columns:
  tokens/s, s/step     micro-batch x grad-accum x seq tokens per optimizer step; median step time
  TFLOP/s, MFU         loop-aware FLOPs per token (model/accounting.py: every loop iteration
                       counted) x tokens/s; MFU against the card's dense peak named in the
                       header, as the trainer's log (training/metrics.py; GPU only). Under
                       --recurrence-sampling / --backprop-depth the FLOPs are those executed:
                       the mean over the timed steps' micro-batches of the forward of their
                       drawn n iterations and the backward of the last min(n, k), as the
                       trainer logs them. Under a random recurrence s/step is every row's mean
                       step time (the looped rows' steps differ in work: a median would pair one
                       step's time with another's count)
  act GiB              bytes saved for backward by one micro-batch (activations, not weights),
                       counted exactly with saved-tensor hooks on one extra forward
  peak GiB             on GPU, this row's own peak allocated memory (weights, gradients,
                       optimizer state and step peak); '-' on CPU (no per-row allocator stats)
  vs base, vs vanilla  step time ratio to those rows (>1 is slower)
  vs eager             with --compile: a VARIANT+compile row's step time / its eager row's

`--hf` adds Hugging Face `GPTNeoXForCausalLM` (attn_implementation="sdpa", eager) at the
vanilla shape of the same compute depth, wrapped to return per-token losses and put through
the same engine construction, ds_config and step: the model a user would otherwise train.
`--compile` adds a row VARIANT+compile per variant (pretrain_mesh.py --compile: each layer
torch.compile'd); its first warm-up step pays the compilation.
`--recurrence-sampling poisson-lognormal --mean-recurrence R --backprop-depth k` (pretrain_mesh.py's
flags, model/recurrence.py) apply to every looped row; vanilla and hf have no loop and run as they
are. `--mesh-routers shared [--mesh-step-embedding]` give the mesh rows routers that run at any depth
(a random recurrence with mesh needs them).

  python benchmarks/throughput.py --device cpu --preset tiny --steps 2
  python benchmarks/throughput.py --device cpu --preset tiny --variants base,mesh --mesh-routers shared \\
      --recurrence-sampling poisson-lognormal --mean-recurrence 3 --backprop-depth 2
  python benchmarks/throughput.py --device cpu --preset pythia-160m --variants vanilla,base,mesh \\
      --seq-length 512 --micro-batch-size 2 --hf --compile
  python benchmarks/throughput.py --device cuda --preset pythia-1.4b --variants mesh --seq-length 4096 \\
      --micro-batch-size 4 --grad-accum 8 --bf16 --ds_config examples/zero1.json --out runs/throughput
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mesh_megatron.config import (ATTENTION_BACKENDS, PRESETS, RECOMPUTE, VARIANTS, ConfigError,  # noqa: E402
                                  ExecutionConfig, ModelConfig, preset, validate)
from mesh_megatron.model.accounting import step_flops_per_token, training_flops_per_token  # noqa: E402
from mesh_megatron.training.metrics import device_peak as run_peak  # noqa: E402

HF = "hf"  # the extra row --hf adds
COMPILED = "+compile"  # suffix of the rows --compile adds
GIB = 2**30


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"model preset ({', '.join(PRESETS)})")
    p.add_argument("--layout", default=None, help="recursive layout P+CrK+Q (default: the preset's)")
    p.add_argument("--variants", default="vanilla,base,mesh", help="comma-separated variants")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sample")
    p.add_argument("--micro-batch-size", type=int, default=2, help="samples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per row (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="must be DeepSpeed's accelerator: cuda when torch sees a GPU")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config",
                   default=os.path.join(ROOT, "examples", "zero1.json"),
                   help="DeepSpeed JSON config, as pretrain_mesh.py's (default: the recipes' zero1.json)")
    p.add_argument("--zero-stage", type=int, default=None, help="override the ds_config's ZeRO stage (0, 1, 2)")
    p.add_argument("--bf16", action="store_true", help="bf16 training (DeepSpeed's bf16: fp32 masters)")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none", help="activation recompute")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto", help="core attention")
    p.add_argument("--vs-attention", choices=ATTENTION_BACKENDS, default=None,
                   help="also time every variant with this core attention (rows VARIANT@BACKEND, same "
                        "rounds); column 'vs @BACKEND' = the variant's step time / its @BACKEND row's")
    p.add_argument("--compile", action="store_true",
                   help="also time every variant with --compile (rows VARIANT+compile, same rounds)")
    p.add_argument("--hf", action="store_true", help="also time HF GPTNeoXForCausalLM (sdpa) at vanilla shape")
    p.add_argument("--recurrence-sampling", choices=("fixed", "poisson-lognormal"), default="fixed",
                   help="pretrain_mesh.py's: loop iterations per micro-batch of the looped rows (FLOPs count "
                        "those executed)")
    p.add_argument("--mean-recurrence", type=float, default=None, help="pretrain_mesh.py's: R of poisson-lognormal")
    p.add_argument("--backprop-depth", type=int, default=None,
                   help="pretrain_mesh.py's: backpropagate only the last k iterations")
    p.add_argument("--mesh-routers", choices=("per-step", "shared"), default=None,
                   help="pretrain_mesh.py's: the mesh rows' routers (shared: any depth)")
    p.add_argument("--mesh-step-embedding", action="store_true", help="pretrain_mesh.py's: with --mesh-routers shared")
    p.add_argument("--schedule", choices=("auto", "alternate", "sequential"), default="auto",
                   help="alternate rounds (all rows in memory) or one row at a time; "
                        "auto alternates when they all fit")
    p.add_argument("--out", default=None, help="folder for throughput.md and throughput.json")
    args = p.parse_args(argv)
    # Bad input: one line naming the fix, before anything is built.
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        p.error(f"--variants {args.variants!r}: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.preset not in PRESETS:
        p.error(f"--preset {args.preset!r} is unknown: choose one of {', '.join(PRESETS)}")
    for flag in ("seq_length", "micro_batch_size", "steps", "grad_accum"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step allocates optimizer state)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device: use --device cpu")
    if args.device == "cpu" and torch.cuda.is_available():
        p.error("--device cpu but DeepSpeed's accelerator is CUDA here (the engine follows it): use --device "
                "cuda, or hide the GPUs with CUDA_VISIBLE_DEVICES=")
    if args.zero_stage is not None and args.zero_stage not in (0, 1, 2):
        p.error(f"--zero-stage {args.zero_stage}: choose 0, 1 or 2")
    args.variant_list = names
    try:
        for v in names:
            validate(model_config(args, v))
        ExecutionConfig(args.attention_backend, args.recompute).validate()
        if args.vs_attention:
            ExecutionConfig(args.vs_attention, args.recompute).validate()
        from mesh_megatron.parallel.deepspeed_config import load_ds_config

        args.ds = load_ds_config(args.ds_config)
    except ConfigError as e:
        p.error(str(e))
    if args.zero_stage is not None:
        args.ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    args.precision = "bf16" if args.bf16 or args.ds.get("bf16", {}).get("enabled") else "fp32"
    return args


def model_config(args: argparse.Namespace, variant: str) -> ModelConfig:
    # vanilla with --layout unrolls P+CrK+Q to the same compute depth (config.preset).
    return preset(args.preset, variant, args.layout, seq_length=args.seq_length, **mesh_overrides(args, variant))


def mesh_overrides(args: argparse.Namespace, variant: str) -> dict:
    if variant != "mesh":
        return {}
    return {k: v for k, v in (("mesh_routers", args.mesh_routers),
                              ("mesh_step_embedding", args.mesh_step_embedding or None)) if v is not None}


def recurrence_flags(args: argparse.Namespace, variant: str) -> list[str]:
    """pretrain_mesh.py's recurrence flags for a row: looped rows only (vanilla and hf have no loop)."""
    if variant == "vanilla":
        return []
    flags = ["--recurrence-sampling", args.recurrence_sampling] if args.recurrence_sampling != "fixed" else []
    flags += ["--mean-recurrence", f"{args.mean_recurrence!r}"] if args.mean_recurrence is not None else []
    flags += ["--backprop-depth", str(args.backprop_depth)] if args.backprop_depth is not None else []
    if variant == "mesh":
        flags += ["--mesh-routers", args.mesh_routers] if args.mesh_routers else []
        flags += ["--mesh-step-embedding"] if args.mesh_step_embedding else []
    return flags


def variant_of(name: str) -> str:
    """A row name's variant: VARIANT, VARIANT@BACKEND, VARIANT+compile, hf (vanilla shape)."""
    return "vanilla" if name == HF else name.split("@")[0].split("+")[0]


def attention_of(args: argparse.Namespace, name: str) -> str:
    """A row's core attention: VARIANT@BACKEND rows (--vs-attention) name theirs."""
    return name.split("@", 1)[1] if "@" in name else args.attention_backend


def run_config(args: argparse.Namespace, name: str, scratch: str):
    """The RunConfig pretrain_mesh.py would build for this row (training/arguments.py parse),
    with the preset's vocabulary kept (the benchmark feeds random tokens, no tokenizer)."""
    from mesh_megatron.training import arguments

    variant = variant_of(name)
    flags = ["--preset", args.preset, "--variant", variant, "--seq-length", str(args.seq_length),
             "--micro-batch-size", str(args.micro_batch_size),
             "--global-batch-size", str(args.micro_batch_size * args.grad_accum),
             "--ds_config", args.ds_path, "--attention-backend", attention_of(args, name),
             "--recompute", args.recompute, "--train-iters", str(args.warmup + args.steps + 1),
             "--eval-interval", "0", "--sample-tokens", "0", "--save", os.path.join(scratch, "unused")]
    flags += ["--layout", args.layout] if args.layout else []
    flags += ["--bf16"] if args.bf16 else []
    flags += ["--compile"] if name.endswith(COMPILED) else []
    flags += recurrence_flags(args, variant) if name != HF else []
    run = arguments.parse(flags, world_size=1)
    model = dataclasses.replace(run.model, vocab_size=model_config(args, variant).vocab_size)
    validate(model)
    return dataclasses.replace(run, model=model)


# ----------------------------------------------------------------------------- rows
class HFCausalLM(torch.nn.Module):
    """GPTNeoXForCausalLM with the trainer's model interface: (tokens, labels) -> per-token
    losses [b, s] in fp32, as MeshGPTModel returns them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        hf_config = GPTNeoXConfig(
            vocab_size=cfg.padded_vocab_size(), hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.compute_depth, num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.ffn_size, hidden_act="gelu", rotary_pct=cfg.rotary_percent,
            rotary_emb_base=cfg.rotary_base, max_position_embeddings=cfg.seq_length,
            layer_norm_eps=cfg.layernorm_epsilon, use_parallel_residual=True, tie_word_embeddings=False,
            attention_dropout=0.0, hidden_dropout=0.0, use_cache=False,
        )
        self.hf = GPTNeoXForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)

    def forward(self, input_ids, labels=None, recurrence_key=None):
        # recurrence_key: what the trainer's step passes every model (a plain stack ignores it)
        logits = self.hf(input_ids=input_ids).logits  # [b, s, v]
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


class Row:
    """One row: a DeepSpeed engine and the trainer's step strategy; `step()` is one optimizer step."""

    def __init__(self, name: str, args: argparse.Namespace, scratch: str):
        from mesh_megatron.model.attention import core_attention_names
        from mesh_megatron.training.trainer import PlainStep, Trainer, build_engine

        self.name, self.args = name, args
        self.run = run_config(args, name, scratch)
        self.cfg = self.run.model
        if name == HF:
            model = HFCausalLM(self.cfg)
            if args.recompute != "none":
                model.hf.gradient_checkpointing_enable()
            self.engine, _ = build_engine(model, self.run)
            self.step_strategy = PlainStep(self.engine, self.run.train.nan_policy, print)
            self.trainer = None
        else:
            self.trainer = Trainer(self.run, (None, None), None)
            self.engine, self.step_strategy = self.trainer.engine, self.trainer.step
        self.engine.train()
        # what the row really ran (an --attention-backend name resolved to the wrong kernel shows here)
        self.core_attention = ",".join(core_attention_names(self.engine.module)) or None  # None: HF GPTNeoX
        self.num_params = sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad)
        # modules torch.compile'd in place (nn.Module.compile, --compile rows)
        self.compiled_layers = sum(getattr(m, "_compiled_call_impl", None) is not None
                                   for m in self.engine.module.modules())
        g = torch.Generator().manual_seed(1)
        m, s, device = args.micro_batch_size, args.seq_length, self.engine.device
        self.batches = []
        for _ in range(args.grad_accum):  # the same micro-batches for every row
            tokens = torch.randint(0, self.cfg.vocab_size, (m, s + 1), generator=g)
            self.batches.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device), torch.ones(m, s, device=device)))
        self.iteration = 0
        self.timed_iterations: list[int] = []  # the step index of each timed step (the draws' key)
        self.times: list[float] = []
        self.losses: list[float] = []  # every step's, warm-up included
        self.step_peak = 0  # bytes above the resident state at the start of a step
        self.resident = 0  # weights + masters + optimizer state (after the first step)

    def step(self) -> float:
        loss, _ = self.step_strategy.train(self.batches, self.iteration)
        self.iteration += 1
        self.losses.append(loss)
        return loss

    def saved_activation_bytes(self) -> int:
        """Bytes autograd keeps for backward (one micro-batch's forward), weights excluded,
        storages counted once."""
        model = self.engine.module
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in weights:
                seen[s.data_ptr()] = s.nbytes()
            return t

        tokens, labels, _ = self.batches[0]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            # (0, 0): the key a random recurrence draws step 0's first micro-batch from
            loss = model(tokens, labels=labels, recurrence_key=(0, 0))
        del loss
        return sum(seen.values())

    def release(self) -> None:
        self.engine.destroy()
        self.engine = self.trainer = self.step_strategy = self.batches = None


# ----------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def timed_step(r: Row) -> None:
    dev = r.args.device
    sync(dev)
    if dev == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    r.timed_iterations.append(r.iteration)
    start = time.perf_counter()
    r.step()
    sync(dev)  # the optimizer step queued after the step's host sync
    r.times.append(time.perf_counter() - start)
    if dev == "cuda":
        r.step_peak = max(r.step_peak, torch.cuda.max_memory_allocated() - before)


def warm_up(r: Row) -> None:
    dev = r.args.device
    before = torch.cuda.memory_allocated() if dev == "cuda" else 0
    for _ in range(r.args.warmup):
        r.step()
    sync(dev)
    if dev == "cuda":
        r.resident = torch.cuda.memory_allocated() - before + r.resident


def fits_together(args: argparse.Namespace, cfgs: dict[str, ModelConfig]) -> bool:
    """Alternate when every row's weights, gradients, masters and Adam state fit in a third of the GPU."""
    if args.schedule != "auto":
        return args.schedule == "alternate"
    if args.device != "cuda":
        return True
    per_param = 2 + 4 + 4 + 8 if args.bf16 else 4 + 4 + 8  # (bf16 model,) fp32 grads, masters, Adam m and v
    params = sum(estimate_params(c) for c in cfgs.values())
    return params * per_param < torch.cuda.get_device_properties(0).total_memory / 3


def estimate_params(cfg: ModelConfig) -> int:
    h = cfg.hidden_size
    return cfg.unique_depth * 12 * h * h + 2 * h * cfg.padded_vocab_size()


def row_names(args: argparse.Namespace) -> list[str]:
    names = list(args.variant_list)
    names += [f"{v}@{args.vs_attention}" for v in args.variant_list if args.vs_attention]
    names += [f"{v}{COMPILED}" for v in args.variant_list if args.compile]
    return names + ([HF] if args.hf else [])


def measure(args: argparse.Namespace, scratch: str) -> tuple[list[dict], dict]:
    names = row_names(args)
    cfgs = {n: model_config(args, variant_of(n)) for n in names}
    status: dict[str, str] = {n: "ok" for n in names}
    rows: dict[str, Row] = {}
    act: dict[str, int] = {}
    engine_info: dict = {}

    def build(n: str) -> Optional[Row]:
        """Build, count activations and warm up; None (row marked OOM) if it does not fit."""
        try:
            before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
            r = Row(n, args, scratch)
            if not engine_info:
                engine_info.update(describe_engine(r))
            if args.device == "cuda":
                r.resident = torch.cuda.memory_allocated() - before  # weights (+ masters)
            act[n] = r.saved_activation_bytes()
            warm_up(r)
            return r
        except Exception as e:  # noqa: BLE001 - an OOM row, anything else is a real error
            if not is_oom(e):
                raise
            status[n] = "OOM"
            free_memory(args.device)
            return None

    def run_steps(r: Row, count: int) -> None:
        try:
            for _ in range(count):
                timed_step(r)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            status[r.name] = "OOM"

    alternate = fits_together(args, cfgs)
    log(f"{'alternating rounds' if alternate else 'one row at a time'}: {', '.join(names)}")
    if alternate:
        for n in names:
            r = build(n)
            if r is not None:
                rows[n] = r
        for _ in range(args.steps):
            for n, r in rows.items():
                if status[n] == "ok":
                    run_steps(r, 1)
        if args.schedule == "auto" and "OOM" in status.values():
            # The estimate counts weights and optimizer state, not activations: measured on an
            # H100, pythia-1.4b at micro-batch 4 fit one at a time but not three together.
            log("out of memory with every row resident: measuring one row at a time")
            for r in rows.values():
                r.release()
            rows.clear()
            act.clear()
            status.update({n: "ok" for n in names})
            free_memory(args.device)
            alternate = False
    if not alternate:
        for n in names:
            r = build(n)
            if r is not None:
                run_steps(r, args.steps)
                rows[n] = r
                r.release()  # keep the numbers only
                free_memory(args.device)
    out = [row(args, n, cfgs[n], rows.get(n), status[n], act.get(n)) for n in names]
    for r in rows.values():
        if r.engine is not None:
            r.release()
    return out, engine_info


def describe_engine(r: Row) -> dict:
    """What the timed step is: the trainer's step class, the ZeRO stage, precision and the
    gradient accumulation dtype in force (parallel/deepspeed_config.py)."""
    from mesh_megatron.parallel.deepspeed_config import gradient_dtypes, zero_stage

    accum_dtype, reduce_dtype = gradient_dtypes(r.run.ds_config)
    return {"step": type(r.step_strategy).__name__, "ds_config": r.args.ds_config,
            "zero_stage": zero_stage(r.run.ds_config), "precision": r.run.train.precision,
            "grad_accum": r.args.grad_accum, "grad_accum_dtype": accum_dtype, "grad_reduce_dtype": reduce_dtype,
            "optimizer": type(r.engine.optimizer).__name__}


def row(args, name: str, cfg: ModelConfig, r: Optional[Row], status: str, act: Optional[int]) -> dict:
    peak = device_peak(args)
    out = {
        "preset": args.preset, "variant": name, "layout": str(cfg.parsed_layout),
        "compute_depth": cfg.compute_depth, "status": status, "compiled": name.endswith(COMPILED),
        "params": r.num_params if r else None,
        "flops_per_token": executed_flops_per_token(args, r.run if r else None, cfg, r.timed_iterations if r else []),
        "tokens_per_s": None, "step_s": None, "tflops": None, "mfu": None,
        "activation_gib": act / GIB if act is not None else None,
        "peak_mem_gib": None, "final_loss": None, "losses": r.losses if r else None,
        "core_attention": r.core_attention if r else None, "compiled_layers": r.compiled_layers if r else None,
    }
    if r is not None and status == "ok" and r.times:
        # under a random recurrence every row's s/step is its mean (the looped rows' steps differ
        # in work; the rows compared alike), as the title says
        step = statistics.mean(r.times) if args.recurrence_sampling != "fixed" else statistics.median(r.times)
        tps = args.micro_batch_size * args.grad_accum * args.seq_length / step
        out.update(step_s=step, tokens_per_s=tps, tflops=tps * out["flops_per_token"] / 1e12,
                   final_loss=r.losses[-1])
        out["mfu"] = tps * out["flops_per_token"] / peak if peak else None
        if args.device == "cuda":
            out["peak_mem_gib"] = (r.resident + r.step_peak) / GIB
    return out


def executed_flops_per_token(args, run, cfg: ModelConfig, iterations: list[int]) -> float:
    """FLOPs per token of the timed steps as executed: at K for every iteration, unless the row
    runs a recurrence (then the mean over the timed steps of training/trainer.py's count, each
    micro-batch at its drawn n and min(n, k): accounting.step_flops_per_token)."""
    rec = run.recurrence if run is not None else None
    if rec is None or not (rec.is_random or rec.backprop_depth is not None) or not iterations:
        return training_flops_per_token(cfg, args.seq_length)
    per_step = [step_flops_per_token(run.model, rec, it, args.grad_accum, args.seq_length) for it in iterations]
    return sum(per_step) / len(per_step)


def device_peak(args) -> Optional[float]:
    """The peak FLOP/s MFU divides by, as in the trainer's log (training/metrics.py)."""
    if args.device != "cuda":
        return None
    peak = run_peak(args.precision)
    return peak.flops if peak else None


def peak_name(args) -> Optional[str]:
    peak = run_peak(args.precision) if args.device == "cuda" else None
    return f"{peak.card.name} dense {peak.kind} {peak.flops / 1e12:g} TFLOP/s" if peak else None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- report
def add_ratios(rows: list[dict]) -> None:
    ref = {r["variant"]: r["step_s"] for r in rows}
    for r in rows:
        for key in ("base", "vanilla"):
            r[f"vs_{key}"] = r["step_s"] / ref[key] if r["step_s"] and ref.get(key) else None
        other = next((n for n in ref if n.startswith(r["variant"] + "@")), None)  # --vs-attention
        r["vs_attention"] = r["step_s"] / ref[other] if other and r["step_s"] and ref[other] else None
        eager = r["variant"][:-len(COMPILED)] if r["compiled"] else None
        r["vs_eager"] = r["step_s"] / ref[eager] if eager and r["step_s"] and ref.get(eager) else None


def header(args: argparse.Namespace, engine: dict) -> dict:
    return {
        "device": device_name(args.device), "mfu_peak": peak_name(args), "dtype": args.precision,
        "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size, "steps": args.steps,
        "warmup": args.warmup, "recompute": args.recompute, "attention_backend": args.attention_backend,
        "recurrence": recurrence_note(args),
        **engine, "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def recurrence_note(args: argparse.Namespace) -> Optional[str]:
    """The looped rows' recurrence, as the table's title names it; None for the default (K)."""
    if args.recurrence_sampling == "fixed" and args.backprop_depth is None:
        return None
    what = (f"{args.recurrence_sampling} R={args.mean_recurrence:g}" if args.recurrence_sampling != "fixed"
            else "fixed K")
    k = "all" if args.backprop_depth is None else args.backprop_depth
    return f"recurrence {what}, backprop depth {k} (looped rows; FLOPs and MFU of the iterations executed)"


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(args: argparse.Namespace, rows: list[dict], head: dict) -> str:
    extra = ([f"vs @{args.vs_attention}"] if args.vs_attention else []) + (["vs eager"] if args.compile else [])
    lines = [f"{args.preset}, seq {args.seq_length}, micro-batch {args.micro_batch_size} x grad-accum "
             f"{args.grad_accum}, {head['dtype']}, ZeRO {head.get('zero_stage', '?')} "
             f"({os.path.basename(args.ds_config)}"
             + (f" with --zero-stage {args.zero_stage}" if args.zero_stage is not None else "")
             + f"; gradients accumulated in {head.get('grad_accum_dtype', '?')}), "
             f"the trainer's {head.get('step', '?')}, recompute {args.recompute}, attention "
             f"{args.attention_backend}, {head['device']}"
             + (f", {head['recurrence']}" if head.get("recurrence") else "")
             + (f" (MFU of the {head['mfu_peak']})" if head["mfu_peak"] else "") + ", "
             f"{'mean' if args.recurrence_sampling != 'fixed' else 'median'} of {args.steps} steps after "
             f"{args.warmup} warm-up",
             "",
             "| variant | layout | params | tokens/s | s/step | TFLOP/s | MFU | act GiB | peak GiB "
             "| vs base | vs vanilla |" + "".join(f" {e} |" for e in extra),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['layout']} | {r['status']} |" + " |" * (8 + len(extra)))
            continue
        name = "HF GPTNeoX (sdpa)" if r["variant"] == HF else r["variant"]
        mfu = fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f")
        cells = ([fmt(r["vs_attention"], ".3f")] if args.vs_attention else []) + \
            ([fmt(r["vs_eager"], ".3f")] if args.compile else [])
        lines.append(
            f"| {name} | {r['layout']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | "
            f"{r['step_s']:.4f} | {r['tflops']:.2f} | {mfu}{'%' if r['mfu'] else ''} | "
            f"{fmt(r['activation_gib'], '.3f')} | {fmt(r['peak_mem_gib'], '.2f')} | "
            f"{fmt(r['vs_base'], '.3f')} | {fmt(r['vs_vanilla'], '.3f')} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines) + "\n"


def log(msg: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_outputs(out: str, md: str, rows: list[dict], head: dict) -> None:
    """throughput.md and throughput.json, each written to a temp name and renamed."""
    os.makedirs(out, exist_ok=True)
    data = [{**head, **r} for r in rows]
    for name, text in (("throughput.md", md), ("throughput.json", json.dumps(data, indent=1) + "\n")):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def prepare(args: argparse.Namespace, scratch: str) -> None:
    """Write the ds_config the rows parse (with --zero-stage applied) into `scratch`, as a file
    like a user's, and check every row's flags before any is built (exit 2, one line)."""
    args.ds_path = os.path.join(scratch, "ds_config.json")
    with open(args.ds_path, "w") as f:
        json.dump(args.ds, f)
    try:
        for n in row_names(args):
            run_config(args, n, scratch)
    except ConfigError as e:
        print(f"throughput.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import deepspeed

    from mesh_megatron.config import ParallelConfig
    from mesh_megatron.parallel.initialize import backend, initialize_distributed, set_seed

    scratch = tempfile.mkdtemp(prefix="mesh_throughput.")
    try:
        prepare(args, scratch)
        initialize_distributed(ParallelConfig())
        deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
        set_seed(0)
        rows, engine = measure(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    add_ratios(rows)
    head = header(args, engine)
    md = table(args, rows, head)
    print(md, end="")
    if args.out:
        write_outputs(args.out, md, rows, head)
    return rows


if __name__ == "__main__":
    main()
