"""One optimizer step and one evaluation pass, in two strategies:

    PlainStep     per micro-batch: engine(tokens) -> masked mean -> engine.backward -> engine.step
                  (DeepSpeed accumulates and steps at the boundary; ZeRO reduces in its hooks);
                  a preemption may stop it between micro-batches (training/grace.py)
    PipelineStep  megatron-core's 1F1B (or interleaved) schedule runs every micro-batch's
                  forward and backward; DeepSpeed then reduces and steps once (under bf16
                  its per-parameter hooks add each micro-batch's gradient into fp32 buffers
                  as the schedule's backward produces it: bf16.immediate_grad_update)

Everything stays on the engine's device. Losses are summed there; one all-reduce over the
world per step carries (loss sum, micro-batches, non-finite count) and is the loop's only host
sync. Nothing syncs per micro-batch: DeepSpeed's throughput timer, which synchronizes at every
forward and step, is off (parallel/deepspeed_config.py); inside engine.step() DeepSpeed adds
its own inf/NaN check of the gradient norm, once the step's backward is queued (counted in
tests/unit/test_host_syncs.py). Every rank adds its copy: tensor-parallel ranks hold the same loss and pipeline stages
other than the last add zeros, so sum / count is the data-parallel mean and every rank sees
the same non-finite count, so all ranks stop (or skip) together.

`--nan-policy stop` needs no per-micro-batch decision: the check runs before the optimizer
applies the step. `--nan-policy skip` must choose, before each backward, between the loss
and a zero loss that still fires ZeRO's hooks, so it pays one small all-reduce per
micro-batch (plain path only; the pipeline path zeroes the step's gradients instead).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from mesh_megatron.model.mor import AuxLossScale, pop_records
from mesh_megatron.training.batches import Batch


class NonFiniteLoss(RuntimeError):
    pass


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp_min(1)  # [b, s] fp32 -> scalar


def _world_sum(values: list[torch.Tensor], device: torch.device) -> list[float]:
    """Sum float64 scalars over every rank: the step's one host sync."""
    stats = torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) for v in values])
    dist.all_reduce(stats)
    return stats.tolist()


class _Step:
    def __init__(self, engine, nan_policy: str, print_fn: Callable[[str], None]):
        self.engine, self.nan_policy, self.print = engine, nan_policy, print_fn
        self.device = engine.device
        # Mixture-of-Recursions: the last step's auxiliary losses (bce, z), means over the
        # micro-batches of the ranks holding the routers; None without MoR.
        self.mor: tuple[float, float] | None = None
        # token choice (set to K by the trainer): the last step's mean fraction of the sequence each
        # recursion's core ran on, as measured (model/mor_token.py records it); None otherwise
        self.mor_depths = 0
        self.mor_processed: tuple[float, ...] | None = None

    def _mor_stats(self, models) -> list[torch.Tensor]:
        """[bce sum, z sum, forwards] of this rank's MoR modules since the last step (zeros on ranks
        without routers): they ride in the step's one all-reduce."""
        total, count = pop_records(models)
        ran = [total[2 + r] if total.numel() > 2 + r else total.new_zeros(()) for r in range(self.mor_depths)]
        return [total[0], total[1], torch.tensor(float(count), dtype=torch.float64), *ran]

    def _set_mor(self, bce: float, z: float, count: float, *ran: float) -> None:
        self.mor = (bce / count, z / count) if count else None
        self.mor_processed = tuple(x / count for x in ran) if count and ran else None

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def _finish(self, iteration: int, total: float, count: float, nonfinite: float,
                skipped: int) -> tuple[float, int]:
        if nonfinite and self.nan_policy == "stop":
            raise NonFiniteLoss(f"loss is {total / max(count, 1)} at iteration {iteration + 1}: stopping "
                                "(lower --lr, check the data, or pass --nan-policy skip to drop such batches)")
        return (total / count if count else float("nan")), skipped


class PlainStep(_Step):
    def train(self, batches: list[Batch], iteration: int,
              boundary: Optional[Callable[[int], bool]] = None) -> Optional[tuple[float, int]]:
        """One optimizer step over this rank's micro-batches; (mean loss, skipped micro-batches).
        `boundary(done)`, asked after each micro-batch but the last: True stops there and
        returns None, the step unfinished (the caller discards it: training/grace.py)."""
        self.engine.train()
        total, count, nonfinite, skipped = self._zero(), self._zero(), self._zero(), 0
        # MoR's auxiliary loss enters backward through MoEAuxLossAutoScaler: give its gradient the
        # LM loss's scale (engine.backward divides by the accumulation steps).
        AuxLossScale.set(1.0 / self.engine.gradient_accumulation_steps())
        for i, (tokens, labels, mask) in enumerate(batches):
            # (iteration, i): what a random recurrence draws this micro-batch's loop count from.
            loss = _masked_mean(self.engine(tokens, labels=labels, recurrence_key=(iteration, i)), mask)
            finite = torch.isfinite(loss.detach())
            if self.nan_policy == "skip" and not self._all_finite(finite):
                self.print(f"warning: non-finite loss at iteration {iteration + 1}; "
                           "micro-batch skipped (--nan-policy skip)")
                loss, skipped = self._zero_loss(), skipped + 1
            else:
                total, count = total + loss.detach().double(), count + 1
                nonfinite = nonfinite + (~finite).double()
            self.engine.backward(loss)
            if i == len(batches) - 1:
                # Before the boundary's engine.step applies anything: the step's one sync.
                stats = _world_sum([total, count, nonfinite, *self._mor_stats([self.engine.module])],
                                   self.device)
                self._set_mor(*stats[3:])
                loss_mean, skipped = self._finish(iteration, *stats[:3], skipped)
            self.engine.step()
            if boundary is not None and i < len(batches) - 1 and boundary(i + 1):
                pop_records([self.engine.module])  # MoR: the discarded step's aux-loss records go with it
                return None
        return loss_mean, skipped

    def _all_finite(self, finite: torch.Tensor) -> bool:
        bad = (~finite).to(torch.float32).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def _zero_loss(self) -> torch.Tensor:
        # Touches every parameter with a zero gradient, so ZeRO's reduce hooks still fire.
        return sum(p.sum() * 0.0 for p in self.engine.module.parameters())

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        self.engine.eval()
        total = self._zero()
        for tokens, labels, mask in batches:
            total = total + _masked_mean(self.engine(tokens, labels=labels), mask).double()
        total, count = _world_sum([total, torch.tensor(float(len(batches)))], self.device)
        self.engine.train()
        return total / count


class PipelineStep(_Step):
    def __init__(self, engine, nan_policy, print_fn, *, chunks: list, stage, pipeline, seq_length: int,
                 micro_batch_size: int):
        super().__init__(engine, nan_policy, print_fn)
        self.chunks, self.stage, self.pipeline = chunks, stage, pipeline
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size

    def _adjust_shapes(self, recv_shapes, send_shapes):
        """[s, b, h] between stages, [2s, b, h] while the embeddings ride along."""
        (s, b, h), = recv_shapes
        recv = [(2 * s if self.stage.receives_embeddings else s, b, h)]
        send = [(2 * s if self.stage.sends_embeddings else s, b, h)]
        return recv, send

    def _run(self, batches: list[Batch], forward_only: bool, iteration: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The schedule over `batches`; (loss sum, micro-batch count) on the last stage, zeros
        elsewhere, as device tensors. Each chunk's iterator numbers its micro-batches, so the
        stage holding the core draws a random recurrence from (iteration, micro-batch) itself."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            i, (tokens, labels, mask) = next(data_iterator)
            out = model(tokens, labels=labels if model.post_process else None, recurrence_key=(iteration, i))

            def loss_func(per_token):  # [b, s] -> masked mean of this micro-batch
                loss = _masked_mean(per_token, mask)
                return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

            return out, loss_func

        if len(self.chunks) == 1:
            results = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(enumerate(batches)), model=self.chunks,
                num_microbatches=len(batches), seq_length=self.seq_length,
                micro_batch_size=self.micro_batch_size, forward_only=forward_only,
                adjust_tensor_shapes_fn=self._adjust_shapes)
        else:
            # Interleaved: one data iterator per chunk; every boundary has one shape, [2s, b, h]
            # when the embeddings ride along (see pipeline_layout.build_layout).
            seq = self.seq_length * (2 if self.pipeline.embeddings_cross else 1)
            results = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=[iter(enumerate(batches)) for _ in self.chunks],
                model=self.chunks, num_microbatches=len(batches), seq_length=seq,
                micro_batch_size=self.micro_batch_size, forward_only=forward_only)
        total = self._zero()
        for r in results:  # in order, as the old host-side sum
            total = total + r["loss"].double()
        return total, torch.tensor(float(len(results)), dtype=torch.float64)

    def train(self, batches: list[Batch], iteration: int) -> tuple[float, int]:
        # The schedule divides each micro-batch's loss by their count: so does MoR's auxiliary loss
        # (MoEAuxLossAutoScaler, on the stage that holds the core).
        AuxLossScale.set(1.0 / len(batches))
        total, count = self._run(batches, forward_only=False, iteration=iteration)
        nonfinite = (~torch.isfinite(total)).double()
        total, count, nonfinite, *mor = _world_sum(
            [torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0) if self.nan_policy == "skip" else total,
             count, nonfinite, *self._mor_stats(self.chunks)], self.device)
        self._set_mor(*mor)
        skipped = 0
        if nonfinite and self.nan_policy == "skip":
            self.print(f"warning: non-finite loss at iteration {iteration + 1}; step skipped "
                       "(--nan-policy skip)")
            for p in self.engine.module.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            # bf16 at ZeRO-1: the gradients already sit in DeepSpeed's fp32 buffers (moved there
            # by its per-parameter hooks, deepspeed_config._bf16_gradients_in_fp32).
            for buffer in getattr(self.engine.optimizer, "fp32_groups_gradients_flat", []):
                buffer.zero_()
            skipped, total, count = len(batches), 0.0, 0.0
        loss_mean, skipped = self._finish(iteration, total, count, nonfinite, skipped)
        # The schedule ran backward itself; hand the gradients to DeepSpeed's reduction and step.
        self.engine.allreduce_gradients()
        self.engine.step()
        return loss_mean, skipped

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        self.engine.eval()
        total, count = _world_sum(list(self._run(batches, forward_only=True)), self.device)
        self.engine.train()
        return total / count
