#!/usr/bin/env python
"""Training throughput of the state-passing variants (and Hugging Face GPTNeoX) at one shape.

One process, one device. A step is what training does per micro-batch and optimizer step:
forward, backward on the mean token loss, gradient clipping at 1.0, AdamW (torch, fused on
CUDA; the trainer hands DeepSpeed the same torch optimizer). Variants are timed in
alternating rounds (one step of each in turn) so drift (clocks, thermal, other load) hits
them alike; the step time is the median of the timed steps after warm-up. When all variants
do not fit in memory at once (GPU, big presets) each is built, measured and freed in turn.

Precision: fp32 by default. `--bf16` does what DeepSpeed's bf16 optimizer does in training:
the model's parameters and activations are bf16 (no autocast), an fp32 master copy of every
parameter holds the optimizer state; after backward the bf16 grads are copied to the masters,
clipped and stepped in fp32, and the result is cast back into the bf16 parameters. Router
softmax and cross entropy stay fp32 inside the model, as in training.

Columns:
  tokens/s, s/step     micro-batch x seq tokens per step; median step time
  TFLOP/s, MFU         loop-aware FLOPs per token (model/accounting.py: every loop iteration
                       counted) x tokens/s; MFU against the card's dense peak named in the
                       header (bf16 runs: bf16 tensor cores; fp32: tf32 or fp32, GPU only)
  act GiB              bytes saved for backward (activations, not weights), counted exactly
                       with saved-tensor hooks on one extra forward: comparable on any device
  peak GiB             on GPU, this variant's own peak allocated memory (its weights, grads,
                       optimizer state and step peak); '-' on CPU (no per-variant allocator stats)
  vs base, vs vanilla  step time ratio to those rows (>1 is slower)

`--hf` adds Hugging Face `GPTNeoXForCausalLM` (attn_implementation="sdpa") at the vanilla
shape of the same compute depth: the model a user would otherwise train.

  python benchmarks/throughput.py --device cpu --preset tiny --steps 2
  python benchmarks/throughput.py --device cpu --preset pythia-160m --variants vanilla,base,mesh \\
      --seq-length 512 --micro-batch-size 2 --hf
  python benchmarks/throughput.py --device cuda --preset pythia-1.4b --seq-length 4096 \\
      --micro-batch-size 1 --bf16 --recompute loop --out runs/throughput
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh_megatron.config import (ATTENTION_BACKENDS, PRESETS, RECOMPUTE, VARIANTS, ConfigError,  # noqa: E402
                                  ExecutionConfig, ModelConfig, ParallelConfig, preset,
                                  to_transformer_config, validate)
from mesh_megatron.model.accounting import training_flops_per_token  # noqa: E402
from mesh_megatron.training.metrics import device_peak as run_peak  # noqa: E402

HF = "hf"  # the extra row --hf adds
GIB = 2**30


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"model preset ({', '.join(PRESETS)})")
    p.add_argument("--layout", default=None, help="recursive layout P+CrK+Q (default: the preset's)")
    p.add_argument("--variants", default="vanilla,base,mesh", help="comma-separated variants")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sample")
    p.add_argument("--micro-batch-size", type=int, default=2, help="samples per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 model + fp32 master weights (as DeepSpeed bf16)")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none", help="activation recompute")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto", help="core attention")
    p.add_argument("--vs-attention", choices=ATTENTION_BACKENDS, default=None,
                   help="also time every variant with this core attention (rows VARIANT@BACKEND, same "
                        "rounds); column 'vs @BACKEND' = the variant's step time / its @BACKEND row's")
    p.add_argument("--hf", action="store_true", help="also time HF GPTNeoXForCausalLM (sdpa) at vanilla shape")
    p.add_argument("--schedule", choices=("auto", "alternate", "sequential"), default="auto",
                   help="alternate rounds (all variants in memory) or one variant at a time; "
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
    for flag in ("seq_length", "micro_batch_size", "steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step allocates optimizer state)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device: use --device cpu")
    args.variant_list = names
    try:
        for v in names:
            validate(model_config(args, v))
        ExecutionConfig(args.attention_backend, args.recompute).validate()
        if args.vs_attention:
            ExecutionConfig(args.vs_attention, args.recompute).validate()
    except ConfigError as e:
        p.error(str(e))
    return args


def model_config(args: argparse.Namespace, variant: str) -> ModelConfig:
    # vanilla with --layout unrolls P+CrK+Q to the same compute depth (config.preset).
    return preset(args.preset, variant, args.layout, seq_length=args.seq_length)


def attention_of(args: argparse.Namespace, name: str) -> str:
    """A row's core attention: VARIANT@BACKEND rows (--vs-attention) name theirs."""
    return name.split("@", 1)[1] if "@" in name else args.attention_backend


# ----------------------------------------------------------------------------- models
def build_mesh(cfg: ModelConfig, args: argparse.Namespace, dtype: torch.dtype, attention: str) -> torch.nn.Module:
    from mesh_megatron.model import MeshGPTModel

    tf_config = to_transformer_config(cfg, ParallelConfig(), params_dtype=dtype)
    execution = ExecutionConfig(attention_backend=attention, recompute=args.recompute)
    model = MeshGPTModel(cfg, tf_config, execution=execution, init_seed=0)
    # DeepSpeed's bf16 engine casts the whole module (routers included) the same way.
    return model.to(device=args.device, dtype=dtype)


def build_hf(cfg: ModelConfig, args: argparse.Namespace, dtype: torch.dtype, attention: str) -> torch.nn.Module:
    """GPTNeoX with the vanilla model's shape: same width, heads, compute depth, padded vocab."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_config = GPTNeoXConfig(
        vocab_size=cfg.padded_vocab_size(), hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.compute_depth, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_size, hidden_act="gelu", rotary_pct=cfg.rotary_percent,
        rotary_emb_base=cfg.rotary_base, max_position_embeddings=cfg.seq_length,
        layer_norm_eps=cfg.layernorm_epsilon, use_parallel_residual=True, tie_word_embeddings=False,
        attention_dropout=0.0, hidden_dropout=0.0, use_cache=False,
    )
    model = GPTNeoXForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
    if args.recompute != "none":
        model.gradient_checkpointing_enable()
    return model.to(args.device)


def loss_fn(model: torch.nn.Module, is_hf: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if is_hf:
        def hf_loss(x, y):
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return hf_loss
    return lambda x, y: model(x, labels=y).mean()  # [b, s] fp32 token losses


class Trainee:
    """One model with its optimizer: `step()` is forward + backward + clip + AdamW."""

    def __init__(self, name: str, cfg: ModelConfig, args: argparse.Namespace):
        self.name, self.cfg, self.args = name, cfg, args
        self.dtype = torch.bfloat16 if args.bf16 else torch.float32
        builder = build_hf if name == HF else build_mesh
        self.model = builder(cfg, args, self.dtype, attention_of(args, name))
        self.model.train()
        from mesh_megatron.model.attention import core_attention_names

        # what the row really ran (an --attention-backend name resolved to the wrong kernel shows here)
        self.core_attention = ",".join(core_attention_names(self.model)) or None  # None: HF GPTNeoX
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        # fp32 masters under bf16 (DeepSpeed's bf16 optimizer); the params themselves in fp32.
        self.masters = ([p.detach().float().clone().requires_grad_(True) for p in self.params]
                        if args.bf16 else self.params)
        decay = [m for m in self.masters if m.ndim >= 2]
        no_decay = [m for m in self.masters if m.ndim < 2]
        cuda = args.device == "cuda"
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda, foreach=None if cuda else True)
        self.loss = loss_fn(self.model, name == HF)
        g = torch.Generator().manual_seed(1)
        vocab = cfg.vocab_size
        tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq_length + 1), generator=g)
        self.x, self.y = tokens[:, :-1].to(args.device), tokens[:, 1:].to(args.device)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.step_peak = 0  # bytes above the resident state at the start of a step
        self.resident = 0  # weights + masters + optimizer state (after the first step)

    def step(self) -> torch.Tensor:
        loss = self.loss(self.x, self.y)
        loss.backward()
        if self.masters is not self.params:
            for p, m in zip(self.params, self.masters):
                m.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(self.masters, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)  # fp32 -> bf16
        return loss.detach()

    def saved_activation_bytes(self) -> int:
        """Bytes autograd keeps for backward (one forward), weights excluded, storages counted once."""
        weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in weights:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss(self.x, self.y)
        del loss
        return sum(seen.values())


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


def timed_step(t: Trainee) -> None:
    dev = t.args.device
    sync(dev)
    if dev == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = t.step()
    sync(dev)
    t.times.append(time.perf_counter() - start)
    t.losses.append(float(loss))
    if dev == "cuda":
        t.step_peak = max(t.step_peak, torch.cuda.max_memory_allocated() - before)


def warm_up(t: Trainee) -> None:
    dev = t.args.device
    before = torch.cuda.memory_allocated() if dev == "cuda" else 0
    for _ in range(t.args.warmup):
        t.step()
    sync(dev)
    if dev == "cuda":
        t.resident = torch.cuda.memory_allocated() - before + t.resident


def fits_together(args: argparse.Namespace, cfgs: dict[str, ModelConfig]) -> bool:
    """Alternate when every variant's weights + masters + Adam state fit in a third of the GPU."""
    if args.schedule != "auto":
        return args.schedule == "alternate"
    if args.device != "cuda":
        return True
    per_param = 2 + 4 + 8 if args.bf16 else 4 + 8  # model copy, fp32 master, Adam m and v
    params = sum(estimate_params(c) for c in cfgs.values())
    return params * per_param < torch.cuda.get_device_properties(0).total_memory / 3


def estimate_params(cfg: ModelConfig) -> int:
    h = cfg.hidden_size
    return cfg.unique_depth * 12 * h * h + 2 * h * cfg.padded_vocab_size()


def measure(args: argparse.Namespace) -> list[dict]:
    names = list(args.variant_list) + [f"{v}@{args.vs_attention}" for v in args.variant_list if args.vs_attention] \
        + ([HF] if args.hf else [])
    cfgs = {n: model_config(args, "vanilla" if n == HF else n.split("@")[0]) for n in names}
    status: dict[str, str] = {n: "ok" for n in names}
    trainees: dict[str, Trainee] = {}
    act: dict[str, int] = {}

    def build(n: str) -> Optional[Trainee]:
        """Build, count activations and warm up; None (row marked OOM) if it does not fit."""
        try:
            before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
            t = Trainee(n, cfgs[n], args)
            if args.device == "cuda":
                t.resident = torch.cuda.memory_allocated() - before  # weights (+ masters)
            act[n] = t.saved_activation_bytes()
            warm_up(t)
            return t
        except Exception as e:  # noqa: BLE001 - an OOM row, anything else is a real error
            if not is_oom(e):
                raise
            status[n] = "OOM"
            free_memory(args.device)
            return None

    def run_steps(t: Trainee, count: int) -> None:
        try:
            for _ in range(count):
                timed_step(t)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            status[t.name] = "OOM"

    alternate = fits_together(args, cfgs)
    log(args, f"{'alternating rounds' if alternate else 'one variant at a time'}: {', '.join(names)}")
    if alternate:
        for n in names:
            t = build(n)
            if t is not None:
                trainees[n] = t
        for _ in range(args.steps):
            for n, t in trainees.items():
                if status[n] == "ok":
                    run_steps(t, 1)
        if args.schedule == "auto" and "OOM" in status.values():
            # The estimate counts weights and optimizer state, not activations: measured on an
            # H100, pythia-1.4b at micro-batch 4 fit one at a time but not three together.
            log(args, "out of memory with every variant resident: measuring one variant at a time")
            trainees.clear()
            act.clear()
            status.update({n: "ok" for n in names})
            free_memory(args.device)
            alternate = False
    if not alternate:
        for n in names:
            t = build(n)
            if t is not None:
                run_steps(t, args.steps)
                trainees[n] = t
                t.model = t.optimizer = t.masters = t.params = t.loss = None  # keep the numbers only
                free_memory(args.device)
    return [row(args, n, cfgs[n], trainees.get(n), status[n], act.get(n)) for n in names]


def row(args, name: str, cfg: ModelConfig, t: Optional[Trainee], status: str, act: Optional[int]) -> dict:
    peak = device_peak(args)
    r = {
        "preset": args.preset, "variant": name, "layout": str(cfg.parsed_layout),
        "compute_depth": cfg.compute_depth, "status": status,
        "params": t.num_params if t else None,
        "flops_per_token": training_flops_per_token(cfg, args.seq_length),
        "tokens_per_s": None, "step_s": None, "tflops": None, "mfu": None,
        "activation_gib": act / GIB if act is not None else None,
        "peak_mem_gib": None, "final_loss": None, "core_attention": t.core_attention if t else None,
    }
    if t is not None and status == "ok" and t.times:
        step = statistics.median(t.times)
        tps = args.micro_batch_size * args.seq_length / step
        r.update(step_s=step, tokens_per_s=tps, tflops=tps * r["flops_per_token"] / 1e12,
                 final_loss=t.losses[-1])
        r["mfu"] = tps * r["flops_per_token"] / peak if peak else None
        if args.device == "cuda":
            r["peak_mem_gib"] = (t.resident + t.step_peak) / GIB
    return r


def device_peak(args) -> Optional[float]:
    """The peak FLOP/s MFU divides by, as in the trainer's log (training/metrics.py)."""
    if args.device != "cuda":
        return None
    peak = run_peak("bf16" if args.bf16 else "fp32")
    return peak.flops if peak else None


def peak_name(args) -> Optional[str]:
    peak = run_peak("bf16" if args.bf16 else "fp32") if args.device == "cuda" else None
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


def header(args: argparse.Namespace) -> dict:
    return {
        "device": device_name(args.device), "mfu_peak": peak_name(args), "dtype": "bf16" if args.bf16 else "fp32",
        "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size, "steps": args.steps,
        "warmup": args.warmup, "recompute": args.recompute, "attention_backend": args.attention_backend,
        "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(args: argparse.Namespace, rows: list[dict]) -> str:
    h = header(args)
    lines = [f"{args.preset}, seq {args.seq_length}, micro-batch {args.micro_batch_size}, {h['dtype']}, "
             f"recompute {args.recompute}, attention {args.attention_backend}, {h['device']}"
             + (f" (MFU of the {h['mfu_peak']})" if h["mfu_peak"] else "") + ", "
             f"median of {args.steps} steps after {args.warmup} warm-up",
             "",
             "| variant | layout | params | tokens/s | s/step | TFLOP/s | MFU | act GiB | peak GiB "
             "| vs base | vs vanilla |" + (f" vs @{args.vs_attention} |" if args.vs_attention else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.vs_attention else "")]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['layout']} | {r['status']} |" + " |" * (8 + bool(args.vs_attention)))
            continue
        name = "HF GPTNeoX (sdpa)" if r["variant"] == HF else r["variant"]
        mfu = fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f")
        lines.append(
            f"| {name} | {r['layout']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | "
            f"{r['step_s']:.4f} | {r['tflops']:.2f} | {mfu}{'%' if r['mfu'] else ''} | "
            f"{fmt(r['activation_gib'], '.3f')} | {fmt(r['peak_mem_gib'], '.2f')} | "
            f"{fmt(r['vs_base'], '.3f')} | {fmt(r['vs_vanilla'], '.3f')} |"
            + (f" {fmt(r['vs_attention'], '.3f')} |" if args.vs_attention else ""))
    return "\n".join(lines) + "\n"


def log(args: argparse.Namespace, msg: str) -> None:
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


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mesh_megatron.parallel.initialize import initialize_distributed, set_seed

    initialize_distributed(ParallelConfig())
    set_seed(0)
    rows = measure(args)
    add_ratios(rows)
    md = table(args, rows)
    print(md, end="")
    if args.out:
        write_outputs(args.out, md, rows, header(args))
    return rows


if __name__ == "__main__":
    main()
