"""Host syncs per optimizer step of the trainer's real step (training/steps.py), counted on CPU.

Every call that makes the host wait for the device is counted with patched counters: the
accelerator's and torch.cuda's synchronize(), and a tensor's item / tolist / cpu / numpy /
float / int / bool. Calls from torch.optim are not counted: AdamW keeps its `step` counter
on the host by design (non-capturable), so reading it waits for nothing.

What a step may cost (accumulation 4, bf16, the example ds_configs):
  - one sync of ours: the all-reduce of (loss sum, count, non-finite) in steps.py;
  - none from DeepSpeed's throughput timer (off unless a ds_config asks for it);
  - DeepSpeed's own check of the gradient norm for inf/NaN inside engine.step() (its
    is_invalid_grad_norm / has_overflow / clip_tensors_by_global_norm), after the whole
    step's backward is queued;
  - not visible here (CUDA only, DeepSpeed's `if not resolves_data_dependency()` branches):
    with overlap_comm, ZeRO-2 synchronizes the device once per micro-batch at the end of its
    backward (stage_1_and_2.py independent_gradient_partition_epilogue frees the reduction
    buffers only once the reduction stream is done): the price of the overlap.
"""

import collections
import os
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TENSOR_SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class SyncCounter:
    """Counts host syncs by call site: 'ours' (mesh_megatron), 'timer' (DeepSpeed's throughput
    timer), 'step' (inside engine.step's optimizer update), 'micro' (anything else: per
    micro-batch)."""

    def __init__(self):
        self.by_kind = collections.Counter()
        self.sites = collections.Counter()
        self.kind_of = {}

    def record(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        files = [f.filename for f in stack]
        if any(os.sep + os.path.join("torch", "optim") + os.sep in f for f in files):
            return  # AdamW's host-side step counter
        caller = stack[-1]
        if os.path.basename(caller.filename) == "timer.py" and "deepspeed" in caller.filename:
            kind = "timer"
        elif caller.filename.startswith(os.path.join(ROOT, "mesh_megatron")):
            kind = "ours"
        elif any(f.name == "_take_model_step" for f in stack):
            kind = "step"
        else:
            kind = "micro"
        site = f"{what} {os.path.basename(caller.filename)}:{caller.lineno} {caller.name}"
        self.by_kind[kind] += 1
        self.sites[site] += 1
        self.kind_of[site] = kind

    def install(self, monkeypatch) -> None:
        from deepspeed.accelerator import get_accelerator

        for name in TENSOR_SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        acc = get_accelerator()
        monkeypatch.setattr(acc, "synchronize", self._wrap("accelerator.synchronize", acc.synchronize))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap("cuda.synchronize", torch.cuda.synchronize))

    def _wrap(self, what, orig):
        def wrapped(*args, **kwargs):
            self.record(what)
            return orig(*args, **kwargs)

        return wrapped


def build_trainer(tmp_path, ds_config: str, accum: int):
    import deepspeed

    from mesh_megatron.parallel.initialize import backend, set_seed
    from mesh_megatron.training import arguments
    from mesh_megatron.training.trainer import Trainer

    run = arguments.parse(["--ds_config", os.path.join(ROOT, ds_config), "--bf16", "--seq-length", "32",
                           "--micro-batch-size", "2", "--global-batch-size", str(2 * accum), "--sample-tokens", "0",
                           "--save", str(tmp_path / "unused")], world_size=1)
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
    set_seed(run.train.seed)
    return Trainer(run, (None, None), None), run


def batches(run, accum, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(accum):
        t = torch.randint(0, run.model.vocab_size, (2, 33), generator=g)
        out.append((t[:, :-1], t[:, 1:], torch.ones(2, 32)))
    return out


@pytest.mark.parametrize("ds_config", ["examples/zero1.json", "examples/zero2.json"], ids=["zero1", "zero2"])
def test_host_syncs_per_step(megatron_single, tmp_path, monkeypatch, ds_config):
    accum = 4
    trainer, run = build_trainer(tmp_path, ds_config, accum)
    # On CPU the trainer keeps torch's default AdamW (fused is for CUDA: test_optimizer.py).
    assert not trainer.fused_adamw and all(not g["fused"] for g in trainer.engine.basic_optimizer.param_groups)
    counter = SyncCounter()
    try:
        # Two steps first: the optimizer state is built in the first, and DeepSpeed's throughput
        # timer starts timing (and synchronizing) from its third step.
        for seed in (0, 1):
            trainer.train_step(batches(run, accum, seed))
        with monkeypatch.context() as patch:
            counter.install(patch)
            trainer.train_step(batches(run, accum, 2))
    finally:
        trainer.engine.destroy()
    report = f"{dict(counter.by_kind)}: {dict(counter.sites)}"
    assert counter.by_kind["ours"] == 1, report
    assert counter.by_kind["timer"] == 0, report
    assert counter.by_kind["micro"] == 0, report
    # The rest is DeepSpeed checking the step's gradient norm for inf/NaN (and for clipping).
    step_sites = {site.rsplit(" ", 1)[1] for site in counter.sites if counter.kind_of[site] == "step"}
    assert counter.by_kind["step"] >= 1, report
    assert step_sites <= {"is_invalid_grad_norm", "has_overflow", "clip_tensors_by_global_norm"}, report
