"""The training loop: DeepSpeed engine around the megatron-core model.

    batch (per DP rank) -> engine(tokens) -> masked mean loss -> engine.backward
    -> engine.step (ZeRO reduce/partition, clip, AdamW, LR schedule at the boundary)

Everything is decided before this runs (RunConfig is validated); this file only executes.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from mesh_megatron.config import (DataConfig, ExecutionConfig, LoggingConfig, ModelConfig, ParallelConfig, RecurrenceConfig,
                                  TrainingConfig, gradient_accumulation_steps, to_transformer_config)
from mesh_megatron.data.sampler import collate
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.model.recurrence import describe_recurrence
from mesh_megatron.model.accounting import (ParameterCounts, expected_flops_per_token, step_flops_per_token,
                                            training_flops_per_token)
from mesh_megatron.parallel.deepspeed_config import (describe_gradient_precision, gradient_precision_warning,
                                                     zero_stage)
from mesh_megatron.training.metrics import StepWindow, Throughput, device_peak, peak_memory_gib
from mesh_megatron.training.schedule import adamw, cosine_with_warmup, fused_adamw_for, keep_fused_choice
from mesh_megatron.training.batches import Batch, StepsAhead, to_device, train_loader
from mesh_megatron.training.sinks import LogSinks
from mesh_megatron.training.steps import NonFiniteLoss, PipelineStep, PlainStep  # noqa: F401 (re-exported)

PARAMS_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    train: TrainingConfig
    data: DataConfig
    logging: LoggingConfig
    ds_config: dict[str, Any]
    ds_config_path: str
    recipe: Optional[dict[str, Any]] = None  # the resolved recipe (training/recipe.py), saved with checkpoints
    overwrite_save: bool = False  # --overwrite-save: replace the checkpoints another run left in --save
    exit_duration_in_mins: Optional[float] = None  # save and exit (status 75) after this wall-clock time
    execution: ExecutionConfig = dataclasses.field(default_factory=ExecutionConfig)  # kernels, recompute
    recurrence: RecurrenceConfig = dataclasses.field(default_factory=RecurrenceConfig)  # loop iterations in training
    num_workers: int = 0  # DataLoader worker processes reading ahead
    distributed_timeout_minutes: int = 10  # --distributed-timeout-minutes: process-group timeout
    preempt_grace_seconds: float = 30.0  # --preempt-grace-seconds: SIGTERM-to-SIGKILL budget planned for


class ModelChunks(torch.nn.Module):
    """The model chunks of one pipeline rank under interleaving, as one module for DeepSpeed.

    Its state dict uses the chunks' own names (which are the full model's names), so
    checkpoints of interleaved runs merge like those of plain stages."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        out = destination if destination is not None else {}
        for chunk in self.chunks:
            out.update(chunk.state_dict(prefix=prefix, keep_vars=keep_vars))
        return out

    def load_state_dict(self, state_dict, strict=True, assign=False):
        for chunk in self.chunks:
            names = chunk.state_dict().keys()
            chunk.load_state_dict({k: v for k, v in state_dict.items() if k in names}, strict=strict)
        return torch.nn.modules.module._IncompatibleKeys([], [])


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def build_engine(model: torch.nn.Module, run: RunConfig):
    """(DeepSpeed engine, fused AdamW?) around `model`: the run's AdamW (fused on CUDA), LR
    schedule and finalized ds_config. The trainer's; benchmarks/throughput.py wraps Hugging
    Face GPTNeoX with it too, so both train with the same optimizer settings."""
    from mesh_megatron.parallel.engine import initialize_engine
    from mesh_megatron.parallel.mpu import MegatronMPU

    # The engine's device (DeepSpeed's accelerator: CUDA when there is one).
    fused = fused_adamw_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    optimizer = adamw(model, run.train, fused=fused)
    engine = initialize_engine(model, optimizer, cosine_with_warmup(optimizer, run.train), run.ds_config,
                               MegatronMPU)
    return engine, fused


class Trainer:
    def __init__(self, run: RunConfig, datasets, tokenizer):
        from megatron.core import parallel_state as ps

        from mesh_megatron.parallel.mpu import mark_replicated_parameters

        self.run, self.tokenizer = run, tokenizer
        self.train_ds, self.valid_ds = datasets
        self.cfg, self.train = run.model, run.train
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.rank0 = dist.get_rank() == 0
        self.sinks = LogSinks(run.logging, {"model": dataclasses.asdict(run.model),
                                            "train": dataclasses.asdict(run.train)}, self.rank0)

        # Under bf16 megatron's layers and the pipeline's p2p buffers work in bf16 (DeepSpeed keeps
        # fp32 master weights and optimizer states).
        tf_config = to_transformer_config(self.cfg, run.parallel, params_dtype=PARAMS_DTYPE[self.train.precision])
        self.pipelined = run.parallel.pipeline_model_parallel_size > 1
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.stage = None
        self.virtual = run.parallel.virtual_pipeline_model_parallel_size or 1
        if self.pipelined:
            from mesh_megatron.parallel.pipeline_layout import build_layout

            pp, pp_rank = run.parallel.pipeline_model_parallel_size, ps.get_pipeline_model_parallel_rank()
            self.pipeline = build_layout(self.cfg, run.parallel.pipeline_chunks, run.parallel.pipeline_split,
                                         uniform_boundaries=self.virtual > 1)
            # Chunk c runs on pipeline rank c % PP (megatron's interleaving order).
            chunks = []
            for v in range(self.virtual):
                self.stage = self.pipeline.stages[v * pp + pp_rank]
                chunk = MeshGPTModel(self.cfg, tf_config, execution=run.execution, stage=self.stage,
                                     init_seed=self.train.seed, recurrence=run.recurrence)
                chunk.vp_stage = v if self.virtual > 1 else None
                chunks.append(chunk)
            model = chunks[0] if self.virtual == 1 else ModelChunks(chunks)
            mark_replicated_parameters(model)
        else:
            model = MeshGPTModel(self.cfg, tf_config, execution=run.execution, init_seed=self.train.seed,
                                 recurrence=run.recurrence)
        self.counts = ParameterCounts.of(model)
        self.engine, self.fused_adamw = build_engine(model, run)
        self.flops_per_token = training_flops_per_token(self.cfg, self.cfg.seq_length,
                                                        run.parallel.tensor_model_parallel_size)
        self.device = self.engine.device
        if self.pipelined:
            self.step = PipelineStep(
                self.engine, self.train.nan_policy, self.sinks.print,
                chunks=[self.engine.module] if self.virtual == 1 else list(self.engine.module.chunks),
                stage=self.stage, pipeline=self.pipeline, seq_length=self.cfg.seq_length,
                micro_batch_size=self.train.micro_batch_size)
        else:
            self.step = PlainStep(self.engine, self.train.nan_policy, self.sinks.print)
        if self.cfg.is_token_choice:  # the log's FLOPs count what each recursion ran on, step by step
            self.step.mor_depths = self.cfg.parsed_layout.loops
        self._valid_batches = None
        self._saves_timed = 0
        self.iteration = 0
        self.clock = time.perf_counter  # times the steps for tokens/s and MFU (a test swaps it)

    # ---------------------------------------------------------------- batches and steps
    def train_batches(self) -> Iterator[list[Batch]]:
        """This rank's micro-batches, one list per step from the current iteration on, on the
        engine's device; the next step's are read while the current one computes (StepsAhead,
        on top of the DataLoader's workers)."""
        loader = train_loader(self.train_ds, self.train, self.dp_rank, self.dp_size, self.iteration,
                              self.device, self.run.num_workers)
        steps = StepsAhead(loader, gradient_accumulation_steps(self.train, self.dp_size))
        try:
            for step in steps:
                yield [to_device(b, self.device) for b in step]
        finally:
            steps.close()

    def train_step(self, batches: list[Batch], preemption=None) -> Optional[tuple[float, int]]:
        """One optimizer step (training/steps.py); (mean loss, skipped micro-batches), or None
        when `preemption` cut it at a micro-batch boundary: then nothing of it is kept
        (training/grace.py: gradients dropped, engine counter and RNG states put back)."""
        boundary = None if preemption is None or self.pipelined \
            else preemption.boundary_check(self.iteration, len(batches))
        cuttable = boundary is not None and preemption.plan.interval(len(batches)) is not None
        if cuttable:
            rng, micro_steps = _rng_state(), self.engine.micro_steps
        if boundary is None:
            out = self.step.train(batches, self.iteration)
        else:
            out = self.step.train(batches, self.iteration, boundary)
        if out is None:
            from mesh_megatron.training.grace import discard_partial_step

            discard_partial_step(self.engine, micro_steps)
            _set_rng_state(rng)
            return None
        self.iteration += 1
        return out

    def evaluate(self) -> float:
        """Mean validation loss over the same held-out micro-batches every time."""
        if self._valid_batches is None:
            m = self.train.micro_batch_size
            self._valid_batches = []
            for i in range(self.train.eval_iters):
                start = (i * self.dp_size + self.dp_rank) * m
                batch = collate(self.valid_ds, [(start + j) % len(self.valid_ds) for j in range(m)])
                self._valid_batches.append(to_device(batch, self.device))
        return self.step.evaluate(self._valid_batches)

    # ---------------------------------------------------------------- checkpoints
    def client_state(self) -> dict[str, Any]:
        return {"iteration": self.iteration,
                "consumed_samples": self.iteration * self.train.global_batch_size,
                "rng": _rng_state(), "recipe": self.run.recipe}

    def resume(self, load_dir: str, tag: str) -> None:
        from mesh_megatron.checkpoint.manager import CheckpointManager

        from mesh_megatron.checkpoint.reshard import is_universal, load_universal

        # A checkpoint resharded by tools/convert_checkpoint.py (another TP/PP/DP layout) carries
        # the optimizer in DeepSpeed's universal format.
        state = (load_universal(self.engine, load_dir, tag) if is_universal(load_dir, tag)
                 else CheckpointManager.load(self.engine, load_dir, tag))
        keep_fused_choice(self.engine.basic_optimizer, self.fused_adamw)
        if state.get("weights_only"):  # an imported model: new run from its weights
            self.sinks.print(f"initialised weights from {load_dir}/{tag} (weights only: fresh optimizer, "
                             "iteration 0)")
            return
        self.iteration = int(state["iteration"])
        _set_rng_state(state["rng"])
        self.sinks.print(f"resumed from {load_dir}/{tag}: iteration {self.iteration}, "
                         f"{state['consumed_samples']} samples consumed")

    # ---------------------------------------------------------------- sample
    @torch.no_grad()
    def greedy_sample(self, prompt: str, new_tokens: int) -> str:
        from mesh_megatron.checkpoint.tensor_parallel import gather_tensor

        model = self.engine.module
        model.eval()
        ids = list(self.tokenizer.tokenize(prompt))
        for _ in range(new_tokens):
            window = torch.tensor([ids[-self.cfg.seq_length:]], device=self.device)
            logits = gather_tensor(model(window)[:, -1].float(), dim=-1, group=self.tp_group)
            ids.append(int(logits[0, :self.tokenizer.vocab_size].argmax()))
        return self.tokenizer.detokenize(ids)

    # ---------------------------------------------------------------- loop
    def fit(self, checkpoints, preemption=None) -> dict[str, float]:
        """Train to --train-iters; with `preemption` (training/preemption.py) stop early, on every
        rank together, after a whole step or (a step too long for the grace period) at a
        micro-batch boundary with that step discarded, and save there (`self.stopped` says why)."""
        t = self.train
        self.stopped = None
        seq = self.cfg.seq_length
        accum = gradient_accumulation_steps(t, self.dp_size)
        tp = self.run.parallel.tensor_model_parallel_size
        rec_on = self.run.recurrence.is_random or self.run.recurrence.backprop_depth is not None
        self.sinks.print(
            f"model: {self.cfg.variant} {self.cfg.parsed_layout} hidden {self.cfg.hidden_size}, "
            f"{self.counts.total:,} params on this TP rank ({self.counts.non_embedding:,} non-embedding, "
            f"{self.counts.router:,} router); {self.flops_per_token:,} train FLOPs/token"
            + (f" at K, {expected_flops_per_token(self.cfg, self.run.recurrence, seq, tp):,.0f} expected under "
               "the recurrence (the log counts each step's executed iterations)" if rec_on else ""))
        self.sinks.print(
            f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x grad-accum {accum} x "
            f"data-parallel {self.dp_size}; {t.global_batch_size * seq:,} tokens/step; "
            f"ZeRO stage {zero_stage(self.run.ds_config)}; {t.precision}, "
            f"{describe_gradient_precision(self.run.ds_config, t.precision)}")
        warning = gradient_precision_warning(self.run.ds_config, t.precision, self.run.ds_config_path)
        if warning:
            self.sinks.print(warning)
        peak = device_peak(t.precision)
        if peak is not None:
            self.sinks.print(peak.describe(torch.cuda.get_device_name()))
        elif torch.cuda.is_available():
            self.sinks.print(f"MFU: - (no peak FLOP/s known for {torch.cuda.get_device_name()}: add the card to "
                             "CARDS in mesh_megatron/training/metrics.py)")
        history: dict[str, float] = {}
        window = StepWindow(self.clock)
        from mesh_megatron.model.attention import core_attention_names

        ex = self.run.execution
        self.sinks.print(f"execution: attention {ex.attention_backend} "
                         f"({', '.join(core_attention_names(self.engine.module))}); recompute {ex.recompute}; "
                         f"compile {'on (each layer; the first step compiles)' if ex.compile else 'off'}")
        if self.run.recurrence.is_random or self.run.recurrence.backprop_depth is not None:
            self.sinks.print(describe_recurrence(self.run.recurrence, self.cfg.parsed_layout.loops))
        if self.pipelined:
            header = ("pipeline stages (by compute):" if self.virtual == 1 else
                      f"pipeline model chunks (by compute; chunk c runs on pipeline rank c % "
                      f"{self.run.parallel.pipeline_model_parallel_size}, interleaved):")
            self.sinks.print(header + "\n" + self.pipeline.report(accum))
        if self.iteration == 0 and t.eval_interval:
            history["valid_loss_start"] = self._log_eval()
        batches = self.train_batches()
        window_flops = 0.0  # FLOPs per token summed over the window's steps, as executed
        step_s = 0.0
        while self.iteration < t.train_iters:
            started = time.monotonic()
            with window.step():  # only steps count towards tokens/s and MFU
                out = self.train_step(next(batches), preemption)
            if out is None:  # cut at a micro-batch boundary by a signal (training/grace.py)
                self.stopped = "signal"
                self.sinks.print(preemption.describe_cut())
                break
            loss, skipped = out
            step_s = time.monotonic() - started
            if rec_on:
                window_flops += step_flops_per_token(self.cfg, self.run.recurrence, self.iteration - 1, accum, seq, tp)
            elif self.step.mor_processed is not None:  # token choice: as routed this step
                window_flops += training_flops_per_token(self.cfg, seq, tp, measured=self.step.mor_processed)
            else:
                window_flops += self.flops_per_token
            self.sinks.scalars(self.iteration, {"train/step_loss": loss})
            history.setdefault("loss_first", loss)
            history["loss_last"] = loss
            if self.iteration % t.log_interval == 0 or self.iteration == t.train_iters:
                elapsed, window_iters, warmup = window.close()
                executed_fpt, window_flops = window_flops / window_iters, 0.0
                thr = Throughput.measure(window_iters * t.global_batch_size * seq, elapsed,
                                         executed_fpt, dist.get_world_size(), peak)
                lr = self.engine.get_lr()[0]
                # DeepSpeed reports the norm from its ZeRO/bf16/fp16 optimizers; the plain fp32
                # optimizer (ZeRO stage 0) clips without keeping it: shown as "-", not logged.
                grad_norm = self.engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else None
                norm = f"{grad_norm:.3f}" if grad_norm is not None else "-"
                mfu = f"{100 * thr.mfu:.1f}%" if thr.mfu is not None else "-"
                aux_name = "balance" if self.cfg.is_token_choice else "bce"  # MoR: token choice / expert choice
                self.sinks.print(
                    f"iter {self.iteration:>6}/{t.train_iters} | loss {loss:.4f} | lr {lr:.3e} | "
                    f"grad-norm {norm} | tokens/s {thr.tokens_per_s:,.0f} | "
                    f"TFLOP/s/dev {thr.tflops_per_device:.4f} | MFU {mfu} | "
                    f"mem {peak_memory_gib():.2f} GiB | {elapsed / window_iters:.3f} s/it"
                    + (f" | skipped {skipped}" if skipped else "")
                    + (f" | mor {aux_name} {self.step.mor[0]:.4f} z {self.step.mor[1]:.3g}" if self.step.mor else "")
                    + (" processed " + "/".join(f"{f:.3f}" for f in self.step.mor_processed)
                       if self.step.mor_processed else "")
                    + (" | warm-up (first window after start)" if warmup else ""))
                self.sinks.scalars(self.iteration, {"train/loss": loss, "train/lr": lr,
                                                    "train/grad_norm": grad_norm,
                                                    "perf/tokens_per_s": thr.tokens_per_s,
                                                    "perf/tflops_per_device": thr.tflops_per_device,
                                                    "perf/mfu": thr.mfu, "perf/warmup": float(warmup),
                                                    **({"perf/flops_per_token": executed_fpt}
                                                       if rec_on or self.step.mor_processed else {}),
                                                    **({f"train/mor_{aux_name}": self.step.mor[0],
                                                        "train/mor_z_loss": self.step.mor[1]}
                                                       if self.step.mor else {})})
            if t.eval_interval and (self.iteration % t.eval_interval == 0 or self.iteration == t.train_iters):
                history["valid_loss"] = self._log_eval()
            if preemption is not None and self.iteration < t.train_iters \
                    and (reason := preemption.should_stop(self.iteration, step_s, checkpoints.last_save_s)):
                self.stopped = reason
                self.sinks.print(f"{preemption.describe(reason)} after iteration {self.iteration}: saving")
                break
            if t.exit_interval and self.iteration % t.exit_interval == 0:
                break
            if checkpoints.save_dir and t.save_interval and self.iteration % t.save_interval == 0 \
                    and self.iteration != t.train_iters:
                self._save(checkpoints, step_s)
        if ex.recompute != "none":
            from mesh_megatron.model.recursive_block import RecursiveBlock

            reruns = sum(m.recomputed for m in self.engine.module.modules() if isinstance(m, RecursiveBlock))
            self.sinks.print(f"recompute {ex.recompute}: {reruns} block forwards rerun in backward on rank 0")
        batches.close()  # stops the read-ahead thread (StepsAhead)
        if checkpoints.save_dir:
            self._save(checkpoints, step_s)
        return history

    def _log_eval(self) -> float:
        loss = self.evaluate()
        self.sinks.print(f"validation at iter {self.iteration} | loss {loss:.4f} | "
                         f"perplexity {math.exp(min(loss, 50)):.2f}")
        self.sinks.scalars(self.iteration, {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 50))})
        return loss

    def _save(self, checkpoints, step_s: float = 0.0) -> None:
        tag = checkpoints.save(self.engine, self.iteration, self.cfg, self.client_state())
        if checkpoints.last_save_s is None:  # already saved at this iteration (skipped)
            self.sinks.print(f"saved checkpoint {checkpoints.save_dir}/{tag}")
            return
        first, self._saves_timed = not self._saves_timed, self._saves_timed + 1
        hashed = ", ".join(f"rank {r}: {len(part)}" for r, part in enumerate(checkpoints.hashed_by_rank))
        size = sum(e["size"] for part in checkpoints.hashed_by_rank for e in part.values())
        self.sinks.print(f"saved checkpoint {checkpoints.save_dir}/{tag} in {checkpoints.last_save_s:.1f} s "
                         f"({size / 2**20:,.1f} MiB of DeepSpeed files; files hashed by the rank that wrote them: "
                         f"{hashed})")
        grace = self.run.preempt_grace_seconds
        if first and checkpoints.last_save_s > grace:
            self.sinks.print(
                f"warning: this save took {checkpoints.last_save_s:.1f} s, more than --preempt-grace-seconds "
                f"{grace:g}: a SIGTERM would be followed by SIGKILL before its save finished (the previous "
                "checkpoint survives, the steps since are lost); give the job a longer grace period (Slurm: "
                "--signal=TERM@SECONDS, KillWait) and pass it as --preempt-grace-seconds")
        elif first and self.pipelined and step_s + checkpoints.last_save_s > grace:
            self.sinks.print(
                f"warning: a step ({step_s:.1f} s) and a save ({checkpoints.last_save_s:.1f} s) take longer than "
                f"--preempt-grace-seconds {grace:g}, and under pipeline parallelism a step is not cut at a "
                "micro-batch after SIGTERM (megatron-core's schedule runs it whole): a SIGTERM late in a step "
                "would be followed by SIGKILL before its save finished; give the job a longer grace period "
                "(Slurm: --signal=TERM@SECONDS, KillWait) and pass it as --preempt-grace-seconds")

    def close(self) -> None:
        self.sinks.close()
        dist.barrier()
        self.engine.destroy()

