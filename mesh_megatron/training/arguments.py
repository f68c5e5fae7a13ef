"""Command-line flags (Megatron / gpt-neox names) -> a validated RunConfig.

Everything cheap is checked here, before any process group, dataset or model exists:
flags, model config, ds_config JSON and batch arithmetic, data files, checkpoint dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional

import torch

from mesh_megatron.config import (ATTENTION_BACKENDS, INPUT_INJECTIONS, LORA_FULL, LORA_TARGETS, MESH_ROUTER_INITS, MESH_ROUTERS, STATE_INITS, MESH_ROUTER_MARGIN, MOR_KV_MODES, MOR_ROUTINGS, PRESETS, RECOMPUTE,
                                  RECURRENCE_SAMPLINGS, VARIANTS, ConfigError, DataConfig, RecurrenceConfig,
                                  validate_recurrence,
                                  ExecutionConfig, LoggingConfig, ModelConfig,
                                  ParallelConfig, TrainingConfig, validate, validate_training)
from mesh_megatron.parallel.initialize import DEFAULT_TIMEOUT_MINUTES
from mesh_megatron.training import recipe

DEFAULTS = TrainingConfig()


def lora_rank(text):
    """--lora-rank: an integer, or 'full' (argparse reports a ValueError as an invalid value)."""
    return text if text == LORA_FULL else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_mesh.py",
        description="Pretrain a MeSH recursive transformer (megatron-core layers, DeepSpeed ZeRO). "
                    "With no data flags it trains the tiny MeSH preset on the corpus shipped in the package.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model shape")
    m.add_argument("--variant", default="mesh", choices=list(VARIANTS), help="state passing between loop iterations")
    m.add_argument("--layout", default=None, help="recursion layout P+CrK+Q, e.g. 4+8R2+4 (default: the preset's)")
    m.add_argument("--config", default=None,
                   help="YAML recipe (sections model/training/parallel/checkpoints/data/logging, keys = flag "
                        "names; or bare ModelConfig fields); flags given on the command line override it")
    m.add_argument("--print-config", action="store_true", help="print the resolved recipe (YAML) and exit")
    m.add_argument("--mesh-slots", type=int, default=None, help="MeSH buffer slots B (default K+3)")
    m.add_argument("--mesh-router-init", choices=list(MESH_ROUTER_INITS), default=None,
                   help="MeSH router biases at init: paper (0, near-uniform routing; the default) or base "
                        "(+margin on a fresh slot per step: MeSH starts as the base recursion)")
    m.add_argument("--mesh-router-margin", type=float, default=None,
                   help=f"--mesh-router-init base: the bias on each step's own slot (default {MESH_ROUTER_MARGIN})")
    m.add_argument("--lora-rank", type=lora_rank, default=None,
                   help="relaxed sharing: a rank-r LoRA per loop iteration on the shared core's --lora-targets "
                        f"(0 = off); '{LORA_FULL}' = full rank with --relax-biases and --relax-norms")
    m.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling alpha / r (default alpha = r)")
    m.add_argument("--lora-targets", default=None,
                   help=f"comma list of core linears with adapters (default: all of {','.join(LORA_TARGETS)})")
    m.add_argument("--relax-biases", action="store_true", default=None,
                   help="each loop iteration gets its own biases of the core's linears (a delta, 0 at init)")
    m.add_argument("--relax-norms", action="store_true", default=None,
                   help="each loop iteration gets its own LayerNorm weight and bias in the core (0 deltas at init)")
    m.add_argument("--mesh-routers", choices=list(MESH_ROUTERS), default=None,
                   help="MeSH routers: per-step (the paper's K + 1 pairs; the default) or shared (one pair for "
                        "the transitional step, one for every loop iteration: runs at any depth, needed by "
                        "--recurrence-sampling poisson-lognormal)")
    m.add_argument("--mesh-step-embedding", action="store_true", default=None,
                   help="--mesh-routers shared: add a learned step embedding to the shared routers' input")
    m.add_argument("--input-injection", choices=list(INPUT_INJECTIONS), default=None,
                   help="what the looped core reads besides the state: none (the default), add (h_t + e) or "
                        "concat-adapter (Huginn: Linear(2h -> h) of [h_t; e]); e = the prelude's output")
    m.add_argument("--state-init", choices=list(STATE_INITS), default=None,
                   help="the loop's initial state: prelude (its output; the default) or noise (Huginn: truncated "
                        "normal in training, zeros in eval; needs --input-injection)")
    m.add_argument("--mor-routing", choices=list(MOR_ROUTINGS), default=None,
                   help="--variant mor (Mixture-of-Recursions): how routers pick each iteration's tokens "
                        "(default expert-choice: per iteration, the top capacity x seq of the active tokens; "
                        "token-choice: one router picks each token's depth, top-1 of a softmax over the K depths)")
    m.add_argument("--mor-capacities", default=None,
                   help="--variant mor: fraction of the sequence each loop iteration processes, one per "
                        "iteration, non-increasing, e.g. 1.0,0.5 (default (K - r) / K)")
    m.add_argument("--mor-alpha", type=float, default=None,
                   help="--variant mor: gate = alpha * sigmoid(router logit) (expert choice, default 0.1) or "
                        "alpha * softmax probability of the chosen depth (token choice, default 1.0)")
    m.add_argument("--mor-aux-weight", type=float, default=None,
                   help="--variant mor: weight of the auxiliary BCE loss (router logits vs top-k membership; "
                        "default 0.001)")
    m.add_argument("--mor-z-loss", type=float, default=None,
                   help="--variant mor: weight of the router z-loss (mean squared logit; default 0 = off)")
    m.add_argument("--mor-balance-weight", type=float, default=None,
                   help="--mor-routing token-choice: weight of the Switch balancing loss over the depths "
                        "(K * sum_j fraction_j * mean prob_j; default 0.01)")
    m.add_argument("--mor-bias-rate", type=float, default=None,
                   help="--mor-routing token-choice: loss-free balancing (the paper's alternative): a per-depth "
                        "bias added to the router's probabilities for the top-1 only, moved by RATE * sign(mean "
                        "share - share of the depth) after every training forward (default off; combine with "
                        "--mor-balance-weight 0 for loss-free only)")
    m.add_argument("--mor-kv", choices=list(MOR_KV_MODES), default=None,
                   help="--variant mor: the export's KV cache in generation: recursion (each iteration caches "
                        "its own tokens) or share-first (later iterations reuse iteration 0's keys/values); "
                        "also selectable when loading the export")
    m.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the preset's)")
    m.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="dropout on the embeddings and on the output of each attention and MLP branch "
                        "(Megatron's flag); 0 as the paper trains")
    m.add_argument("--attention-dropout", type=float, default=0.0,
                   help="dropout on the attention probabilities (Megatron's flag); 0 as the paper trains")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1, help="tensor-parallel ranks (megatron-core)")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                     help="pipeline stages (megatron-core 1F1B schedule; the looped core stays on one stage)")
    par.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                     help="model chunks per pipeline rank (interleaved 1F1B); needs PP x V pieces")
    par.add_argument("--pipeline-split", default=None,
                     help="compute layers per stage, e.g. 4,16,4 (the core counts C*K); default: balanced")
    par.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default="examples/zero2.json",
                     help="DeepSpeed JSON config (ZeRO stage, bf16...)")
    par.add_argument("--local_rank", "--local-rank", type=int, default=None,
                     help="set by the deepspeed launcher; the LOCAL_RANK env is used")
    par.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed-style launch lines")
    par.add_argument("--distributed-timeout-minutes", type=int, default=DEFAULT_TIMEOUT_MINUTES,
                     help="how long the rendezvous and any collective wait for a missing rank before "
                          "every rank fails (Megatron's flag)")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=None,
                   help=f"samples per rank per forward (default: ds_config or {DEFAULTS.micro_batch_size})")
    t.add_argument("--global-batch-size", type=int, default=None,
                   help=f"samples per optimizer step (default: ds_config or {DEFAULTS.global_batch_size})")
    t.add_argument("--train-iters", type=int, default=DEFAULTS.train_iters, help="optimizer steps")
    t.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    t.add_argument("--min-lr", type=float, default=DEFAULTS.min_lr, help="cosine decays to this")
    t.add_argument("--lr-warmup-fraction", type=float, default=DEFAULTS.lr_warmup_fraction,
                   help="fraction of --train-iters with linear warmup")
    t.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW weight decay")
    t.add_argument("--adam-beta1", type=float, default=DEFAULTS.adam_beta1, help="AdamW beta1")
    t.add_argument("--adam-beta2", type=float, default=DEFAULTS.adam_beta2, help="AdamW beta2")
    t.add_argument("--adam-eps", type=float, default=DEFAULTS.adam_eps, help="AdamW epsilon")
    t.add_argument("--clip-grad", type=float, default=DEFAULTS.clip_grad, help="gradient-norm clipping")
    t.add_argument("--bf16", action="store_true", help="bf16 weights and activations (GPU, and CPU)")
    t.add_argument("--fp16", action="store_true", help="fp16 with loss scaling (GPU only)")
    t.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default="auto",
                   help="core attention kernel: auto (te on a GPU with Transformer Engine, else sdpa), "
                        "te, sdpa (torch scaled_dot_product_attention), local (megatron's unfused reference)")
    t.add_argument("--recompute", choices=list(RECOMPUTE), default="none",
                   help="activation recomputation: none, loop (each core iteration and prelude/coda as "
                        "blocks; keeps only the states between iterations), layer (every layer)")
    t.add_argument("--recurrence-sampling", choices=list(RECURRENCE_SAMPLINGS), default="fixed",
                   help="loop iterations per training forward: fixed (the layout's K) or poisson-lognormal "
                        "(Huginn: n = Poisson(LogNormal(log R - 0.125, 0.5)) + 1 per micro-batch, drawn from "
                        "(seed, iteration, micro-batch)); evaluation and the export run K")
    t.add_argument("--mean-recurrence", type=float, default=None,
                   help="poisson-lognormal: R, the mean of the Poisson rate (E[iterations] = R + 1, Huginn's "
                        "mean_recurrence)")
    t.add_argument("--backprop-depth", type=int, default=None,
                   help="backpropagate through only the last k loop iterations (the first max(n - k, 0) run "
                        "under no_grad; Huginn's mean_backprop_depth); default: all")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer layer (the looped core is one compiled layer run K "
                        "times); the first step pays the compilation. Same losses as eager to rounding")
    t.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes reading batches ahead (default 2 on GPU, 0 on CPU)")
    t.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed")
    t.add_argument("--nan-policy", choices=["stop", "skip"], default=DEFAULTS.nan_policy,
                   help="on a non-finite loss: stop with a message, or skip that micro-batch")

    c = p.add_argument_group("checkpoints and evaluation")
    c.add_argument("--save", default=None,
                   help=f"directory to write checkpoints to (embedded default: {EMBEDDED_DEFAULT_SAVE})")
    c.add_argument("--load", default=None, help="directory to resume from (its 'latest' checkpoint)")
    c.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    c.add_argument("--exit-interval", type=int, default=None,
                   help="save (if --save) and exit when the iteration is a multiple of N")
    c.add_argument("--keep-last", type=int, default=DEFAULTS.keep_last,
                   help="checkpoints of this run kept on disk (other runs' are never pruned)")
    c.add_argument("--overwrite-save", action="store_true",
                   help="--save may hold another run's checkpoints: they are deleted after this run's first save")
    c.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="after this much wall-clock time, finish the step, save and exit with status 75 "
                        "(as on SIGTERM/SIGINT)")
    c.add_argument("--preempt-grace-seconds", type=float, default=30.0,
                   help="time between SIGTERM and SIGKILL the run plans for (the DeepSpeed launcher's 30 s; "
                        "Slurm's KillWait): a first save slower than this is warned about")
    c.add_argument("--eval-interval", type=int, default=DEFAULTS.eval_interval,
                   help="validate every N iterations (0: never)")
    c.add_argument("--eval-iters", type=int, default=DEFAULTS.eval_iters, help="micro-batches per validation")
    c.add_argument("--log-interval", type=int, default=DEFAULTS.log_interval, help="iterations per log line")
    c.add_argument("--sample-prompt", default=DEFAULTS.sample_prompt, help="prompt of the greedy sample")
    c.add_argument("--sample-tokens", type=int, default=DEFAULTS.sample_tokens,
                   help="greedy sample length printed at the end (0: none)")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="*", default=[],
                   help="indexed dataset prefixes, optionally weighted: [w1] prefix1 [w2] prefix2 ...")
    d.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    d.add_argument("--tokenizer-type", choices=["sentencepiece", "hf"], default=None,
                   help="sentencepiece .model or Hugging Face tokenizer.json")
    d.add_argument("--tokenizer-model", default=None, help="path of the tokenizer file")
    d.add_argument("--data-cache-dir", default=None, help="dataset index cache (default ~/.cache/mesh_megatron)")

    lg = p.add_argument_group("logging")
    lg.add_argument("--tensorboard-dir", default=None, help="write tensorboard scalars here")
    lg.add_argument("--wandb-project", default=None, help="log to wandb under this project")
    lg.add_argument("--log-jsonl", default=None, help="append one JSON record per log line to this file")
    lg.add_argument("--wandb-mode", choices=["offline", "online"], default="offline", help="wandb mode")
    return p


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return recipe.model_config(args)  # preset + overrides of the resolved recipe, or every field


EMBEDDED_DEFAULT_SAVE = "checkpoints/embedded-default"


def tokenizer_source(data: DataConfig) -> tuple[str, str]:
    """(type, file) of this run's tokenizer: the given one or the embedded sentencepiece model."""
    from mesh_megatron.data.embedded import EMBEDDED_TOKENIZER_MODEL

    if data.tokenizer_model:
        return data.tokenizer_type or "sentencepiece", data.tokenizer_model
    return "sentencepiece", str(EMBEDDED_TOKENIZER_MODEL)


def run_tokenizer(data: DataConfig):
    """The tokenizer of this run: the given file, or the one shipped with the embedded corpus."""
    from mesh_megatron.data.embedded import embedded_tokenizer
    from mesh_megatron.data.tokenizer import build_tokenizer

    if data.tokenizer_model:
        try:
            return build_tokenizer(data.tokenizer_type or "sentencepiece", data.tokenizer_model)
        except (ValueError, OSError) as e:
            raise ConfigError(str(e)) from None
    return embedded_tokenizer()


def _fit_vocab(model: ModelConfig, tokenizer, config_path: Optional[str], parallel: ParallelConfig,
               model_fields: dict) -> ModelConfig:
    """The model's vocabulary is the tokenizer's, unless the recipe fixes vocab_size:
    then the tokenizer must fit in the padded embedding."""
    if "vocab_size" not in model_fields:
        return dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
    padded = model.padded_vocab_size(parallel.tensor_model_parallel_size)
    if tokenizer.vocab_size > padded:
        raise ConfigError(f"tokenizer vocab ({tokenizer.vocab_size}) is larger than the model's padded vocab "
                          f"({padded}, vocab_size {model.vocab_size} in {config_path}): raise vocab_size "
                          "or use the tokenizer the model was built for")
    return model


def _check_recorded_layout_fits(args, parallel: ParallelConfig, world: int) -> None:
    """TP/PP taken from --load's recorded recipe that this launch cannot hold: say where the
    sizes came from and the two ways on (more processes, or a resharded checkpoint)."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    recorded = getattr(args, "from_recorded", set())
    if not ({"tensor_model_parallel_size", "pipeline_model_parallel_size"} & recorded) or world % (tp * pp) == 0:
        return
    raise ConfigError(
        f"--load {args.load} was saved with TP={tp} PP={pp} (its recorded recipe), which world size {world} "
        f"cannot hold: launch a multiple of {tp * pp} processes, or reshard first with `python "
        f"tools/convert_checkpoint.py --load {args.load} --save NEW_DIR --tensor-model-parallel-size N "
        "--pipeline-model-parallel-size M` and --load NEW_DIR with those sizes")


def _fitted_model(args: argparse.Namespace, model: ModelConfig, parallel: ParallelConfig,
                  world: int) -> tuple[ModelConfig, DataConfig]:
    """The model with its vocabulary fitted to the run's tokenizer, validated, and the data."""
    if args.data_path and not args.tokenizer_model:
        raise ConfigError("--data-path needs --tokenizer-type and --tokenizer-model (the tokenizer "
                          "the data was preprocessed with)")
    model = _fit_vocab(model, run_tokenizer(data := DataConfig(
        data_path=list(args.data_path), split=args.split, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, cache_dir=args.data_cache_dir)), args.config, parallel,
        args.model_fields)
    validate(model, parallel, world)
    return model, data


def initial_model(argv: list[str]) -> tuple[ModelConfig, int, DataConfig]:
    """(model, init seed, data) of the run these pretrain_mesh.py flags start, as one process
    builds it (TP = PP = 1), without the run's --save/--load checks: what a model is at
    iteration 0 (tools/probe_mesh.py --init-only)."""
    args = recipe.resolve_args(build_parser, argv)
    model, data = _fitted_model(args, _model_config(args), ParallelConfig(), 1)
    return model, args.seed, data


def parse(argv: Optional[list[str]] = None, world_size: Optional[int] = None):
    """Flags -> RunConfig, every cheap check done. Raises ConfigError with one clear line."""
    from mesh_megatron.parallel.deepspeed_config import finalize_ds_config, load_ds_config, resolve_batch
    from mesh_megatron.training.trainer import RunConfig

    args = recipe.resolve_args(build_parser, argv)  # defaults < --load's recipe < --config < flags
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    from mesh_megatron.parallel.pipeline_layout import build_layout, parse_split

    parallel = ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              parse_split(args.pipeline_split), args.virtual_pipeline_model_parallel_size)
    _check_recorded_layout_fits(args, parallel, world)
    if parallel.virtual_pipeline_model_parallel_size and parallel.pipeline_model_parallel_size < 2:
        raise ConfigError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2")
    if parallel.tensor_model_parallel_size > world:
        raise ConfigError(f"--tensor-model-parallel-size {parallel.tensor_model_parallel_size} is larger "
                          f"than the world size {world}: launch at least that many ranks or lower it")
    model = _model_config(args)
    recurrence = RecurrenceConfig(sampling=args.recurrence_sampling, mean_recurrence=args.mean_recurrence,
                                  backprop_depth=args.backprop_depth, seed=args.seed)
    validate_recurrence(model, recurrence)  # before --print-config: tools/ablate.py checks arms with it
    if args.print_config:
        raise SystemExit(recipe.print_config(build_parser(), args, model, parallel, world))
    model, data = _fitted_model(args, model, parallel, world)
    build_layout(model, parallel.pipeline_chunks, parallel.pipeline_split)  # refuses bad splits
    dp = world // (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size)

    ds = load_ds_config(args.ds_config)
    micro, global_ = resolve_batch(ds, args.micro_batch_size, args.global_batch_size, dp, args.ds_config)
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive: pick one")
    precision = "bf16" if args.bf16 or ds.get("bf16", {}).get("enabled") else \
        "fp16" if args.fp16 or ds.get("fp16", {}).get("enabled") else "fp32"
    train = TrainingConfig(
        micro_batch_size=micro, global_batch_size=global_, train_iters=args.train_iters, lr=args.lr,
        min_lr=args.min_lr, lr_warmup_fraction=args.lr_warmup_fraction, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        precision=precision, seed=args.seed,
        save=args.save or (None if args.data_path else EMBEDDED_DEFAULT_SAVE), load=args.load,
        save_interval=args.save_interval, keep_last=args.keep_last, eval_interval=args.eval_interval,
        eval_iters=args.eval_iters, log_interval=args.log_interval, nan_policy=args.nan_policy,
        sample_tokens=args.sample_tokens, sample_prompt=args.sample_prompt, exit_interval=args.exit_interval,
    )
    validate_training(train, dp)
    if precision == "fp16" and model.is_mor:
        raise ConfigError("--variant mor with fp16: the auxiliary loss's gradient would miss fp16's dynamic loss "
                          "scale (it is injected in backward, model/mor.py): use --bf16 or fp32")
    if parallel.virtual_pipeline_model_parallel_size:
        from mesh_megatron.config import gradient_accumulation_steps

        accum = gradient_accumulation_steps(train, dp)
        if accum % parallel.pipeline_model_parallel_size:
            raise ConfigError(f"interleaved pipelining runs micro-batches in groups of PP="
                              f"{parallel.pipeline_model_parallel_size}, but a step has {accum} micro-batches "
                              "(global / (micro x data-parallel)): make it a multiple of PP")
    ds = finalize_ds_config(ds, train, dp, args.ds_config, parallel.pipeline_model_parallel_size,
                            recomputed_shared_core=args.recompute != "none" and model.core_shared)

    if data.data_path:
        from mesh_megatron.data.datasets import parse_blend
        from mesh_megatron.data.validation import inspect_indexed_dataset

        for prefix in parse_blend(data.data_path)[0]:
            try:
                inspect_indexed_dataset(prefix)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    from mesh_megatron.checkpoint.manager import LATEST, check_save_dir, same_dir

    check_save_dir(train.save, args.load, args.overwrite_save)
    if not args.preempt_grace_seconds > 0:
        raise ConfigError(f"--preempt-grace-seconds {args.preempt_grace_seconds} must be positive")
    if args.distributed_timeout_minutes < 1:
        raise ConfigError(f"--distributed-timeout-minutes {args.distributed_timeout_minutes} must be at least 1")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins < 0:
        raise ConfigError(f"--exit-duration-in-mins {args.exit_duration_in_mins} is negative: pass minutes >= 0")
    # --load DIR --save DIR before DIR has a checkpoint starts fresh (a requeued job's first run).
    if args.load and not (same_dir(args.load, train.save) and not os.path.exists(os.path.join(args.load, LATEST))):
        from mesh_megatron.checkpoint.manager import check_model_config, check_parallel_layout, read_latest

        tag = read_latest(args.load)
        check_model_config(args.load, tag, model)
        check_parallel_layout(args.load, tag, parallel)
    execution = ExecutionConfig(attention_backend=args.attention_backend, recompute=args.recompute,
                                compile=bool(args.compile))
    from mesh_megatron.parallel.deepspeed_config import check_recompute

    check_recompute(ds, execution.recompute, model.core_shared and model.parsed_layout.loops > 1, args.ds_config)
    from mesh_megatron.model.attention import resolve_attention_backend

    resolve_attention_backend(execution.attention_backend)  # te without Transformer Engine: refused here
    if args.num_workers is not None and args.num_workers < 0:
        raise ConfigError(f"--num-workers {args.num_workers} is negative: pass 0 (read in the training "
                          "process) or more")
    num_workers = args.num_workers if args.num_workers is not None else (2 if torch.cuda.is_available() else 0)
    logging = LoggingConfig(tensorboard_dir=args.tensorboard_dir, wandb_project=args.wandb_project,
                            wandb_mode=args.wandb_mode, jsonl_path=args.log_jsonl)
    return RunConfig(model=model, parallel=parallel, train=train, data=data, logging=logging,
                     ds_config=ds, ds_config_path=args.ds_config,
                     recipe=recipe.resolved(build_parser(), args, model, micro, global_, precision),
                     overwrite_save=args.overwrite_save, exit_duration_in_mins=args.exit_duration_in_mins,
                     execution=execution, recurrence=recurrence, num_workers=num_workers,
                     distributed_timeout_minutes=args.distributed_timeout_minutes,
                     preempt_grace_seconds=args.preempt_grace_seconds)


