"""The training loop on CPU, in process: host syncs per step, and the tokens/s and MFU window.

Host syncs per optimizer step of the trainer's real step (training/steps.py), counted on CPU.

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
import json
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

    # Short micro-batches: bf16 matmuls are slow on CPU (the 4,096-token output layer dominates).
    run = arguments.parse(["--ds_config", os.path.join(ROOT, ds_config), "--bf16", "--seq-length", "8",
                           "--micro-batch-size", "1", "--global-batch-size", str(accum), "--sample-tokens", "0",
                           "--save", str(tmp_path / "unused")], world_size=1)
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
    set_seed(run.train.seed)
    return Trainer(run, (None, None), None), run


ACCUM = 4


@pytest.fixture(scope="module")
def trainers(megatron_single, tmp_path_factory):
    """One bf16 trainer per example ds_config, built on first use (accumulation 4)."""
    built = {}

    def get(ds_config):
        if ds_config not in built:
            built[ds_config] = build_trainer(tmp_path_factory.mktemp("trainer"), ds_config, ACCUM)
        return built[ds_config]

    yield get
    for trainer, _ in built.values():
        trainer.engine.destroy()


def batches(run, accum, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    m, s = run.train.micro_batch_size, run.model.seq_length
    for _ in range(accum):
        t = torch.randint(0, run.model.vocab_size, (m, s + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:], torch.ones(m, s)))
    return out


@pytest.mark.parametrize("ds_config", ["examples/zero1.json", "examples/zero2.json"], ids=["zero1", "zero2"])
def test_host_syncs_per_step(trainers, monkeypatch, ds_config):
    trainer, run = trainers(ds_config)
    # On CPU the trainer keeps torch's default AdamW (fused is for CUDA: test_optimizer.py).
    assert not trainer.fused_adamw and all(not g["fused"] for g in trainer.engine.basic_optimizer.param_groups)
    # Two steps first: the optimizer state is built in the first, and DeepSpeed's throughput
    # timer starts timing (and synchronizing) from its third step.
    for seed in (0, 1):
        trainer.train_step(batches(run, ACCUM, seed))
    counter = SyncCounter()
    with monkeypatch.context() as patch:
        counter.install(patch)
        trainer.train_step(batches(run, ACCUM, 2))
    report = f"{dict(counter.by_kind)}: {dict(counter.sites)}"
    assert counter.by_kind["ours"] == 1, report
    assert counter.by_kind["timer"] == 0, report
    assert counter.by_kind["micro"] == 0, report
    # The rest is DeepSpeed checking the step's gradient norm for inf/NaN (and for clipping).
    step_sites = {site.rsplit(" ", 1)[1] for site in counter.sites if counter.kind_of[site] == "step"}
    assert counter.by_kind["step"] >= 1, report
    assert step_sites <= {"is_invalid_grad_norm", "has_overflow", "clip_tensors_by_global_norm"}, report


def fp32_masters(optimizer) -> list:
    """DeepSpeed's fp32 master weights: ZeRO-2's partitions (stage_1_and_2.py), bf16 ZeRO-1's
    (BF16_Optimizer), bf16 ZeRO-0's groups (FP16_UnfusedOptimizer)."""
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(optimizer, name):
            return list(getattr(optimizer, name))
    return [t for group in optimizer.fp32_groups for t in group]


@pytest.mark.parametrize("ds_config", ["examples/zero0.json", "examples/zero1.json", "examples/zero2.json"],
                         ids=["zero0", "zero1", "zero2"])
def test_a_cut_step_leaves_no_trace(megatron_single, tmp_path, ds_config):
    """A step cut after 2 of its 4 micro-batches (training/grace.py) is discarded: trainer A
    starts a step on other batches, is cut (drawing random numbers meanwhile, as dropout
    would), then takes two steps; an identical trainer B takes the same two steps only. Same
    losses, gradient norms, weights (bf16 copies and fp32 masters), counters and RNG states."""
    import types

    from mesh_megatron.training.grace import GracePlan

    a, run = build_trainer(tmp_path / "a", ds_config, ACCUM)
    b, _ = build_trainer(tmp_path / "b", ds_config, ACCUM)
    asked = []

    def cut_at_2(done):
        asked.append(done)
        torch.rand(3)
        return done == 2

    cut = types.SimpleNamespace(plan=GracePlan(1.0, step_s=10.0), boundary_check=lambda it, accum: cut_at_2)
    try:
        rng = torch.get_rng_state()
        assert a.train_step(batches(run, ACCUM, 99), cut) is None
        assert asked == [1, 2] and a.iteration == 0 and torch.equal(torch.get_rng_state(), rng)
        for seed in (0, 1):
            assert a.train_step(batches(run, ACCUM, seed)) == b.train_step(batches(run, ACCUM, seed))
            assert a.engine.get_global_grad_norm() == b.engine.get_global_grad_norm()
        assert (a.engine.micro_steps, a.engine.global_steps) == (b.engine.micro_steps, b.engine.global_steps)
        for pa, pb in zip(a.engine.module.parameters(), b.engine.module.parameters()):
            assert torch.equal(pa, pb)
        masters_a, masters_b = fp32_masters(a.engine.optimizer), fp32_masters(b.engine.optimizer)
        assert len(masters_a) == len(masters_b) > 0
        assert all(torch.equal(ma, mb) for ma, mb in zip(masters_a, masters_b))
    finally:
        a.engine.destroy()
        b.engine.destroy()


def test_tokens_per_s_and_mfu_count_training_steps_only(trainers, monkeypatch):
    """fit() with a fake clock: every step takes 1 s, every validation and checkpoint save
    100 s. The logged tokens/s and MFU must be those of 1 s steps; the first window after
    start is marked as warm-up, the others not."""
    import dataclasses
    import types

    from mesh_megatron.training import trainer as trainer_module
    from mesh_megatron.training.metrics import CARDS, Peak

    trainer, run = trainers("examples/zero1.json")
    now = [0.0]

    def advance(seconds, result=None):
        def f(*args, **kwargs):
            now[0] += seconds
            return result
        return f

    h100 = Peak(next(c for c in CARDS if c.name == "H100 SXM"), "bf16", 989e12)
    monkeypatch.setattr(trainer_module, "device_peak", lambda precision: h100)
    monkeypatch.setattr(trainer_module.torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(trainer, "clock", lambda: now[0])
    monkeypatch.setattr(trainer, "train_batches", lambda: (([] for _ in iter(int, 1))))  # the fake step ignores them
    monkeypatch.setattr(trainer.step, "train", advance(1.0, (2.0, 0)))
    monkeypatch.setattr(trainer, "evaluate", advance(100.0, 2.0))
    monkeypatch.setattr(trainer, "_save", advance(100.0))
    lines, records = [], []
    monkeypatch.setattr(trainer.sinks, "print", lines.append)
    monkeypatch.setattr(trainer.sinks, "scalars", lambda step, values: records.append(values))
    start = trainer.iteration
    monkeypatch.setattr(trainer, "train", dataclasses.replace(
        trainer.train, train_iters=start + 6, log_interval=2, eval_interval=1, save_interval=1))
    trainer.fit(types.SimpleNamespace(save_dir="unused"))

    perf = [r for r in records if "perf/tokens_per_s" in r]
    assert len(perf) >= 3 and now[0] > 6 * 100  # six 1 s steps and many 100 s pauses
    tokens_per_step = run.train.global_batch_size * run.model.seq_length
    for i, r in enumerate(perf):
        assert r["perf/tokens_per_s"] == pytest.approx(tokens_per_step / 1.0)
        assert r["perf/mfu"] == pytest.approx(tokens_per_step * trainer.flops_per_token / 989e12)
        assert r["perf/warmup"] == float(i == 0)
    logged = [line for line in lines if line.startswith("iter")]
    assert len(logged) == len(perf) and "warm-up" in logged[0] and not any("warm-up" in x for x in logged[1:])
    assert any("H100 SXM" in line and "989 TFLOP/s" in line for line in lines)


def test_mfu_counts_the_iterations_each_step_executed(trainers, monkeypatch):
    """Under a random recurrence the logged TFLOP/s and MFU count what each step ran: the mean
    over the window's steps (here one per window) of the mean over its micro-batches of the FLOPs at that
    micro-batch's drawn (n, min(n, k)), and the record carries that FLOPs/token. Red check
    (measured with 2-step windows): the fixed count (trainer.flops_per_token) logged 3,390,720
    FLOPs/token where the window executed 3,845,184."""
    import dataclasses
    import types

    from mesh_megatron.config import RecurrenceConfig
    from mesh_megatron.model.accounting import flops_per_token
    from mesh_megatron.model.recurrence import draw_iterations
    from mesh_megatron.training import trainer as trainer_module
    from mesh_megatron.training.metrics import CARDS, Peak

    trainer, run = trainers("examples/zero1.json")
    now = [0.0]

    def step(batches, iteration):
        now[0] += 1.0
        return 2.0, 0

    h100 = Peak(next(c for c in CARDS if c.name == "H100 SXM"), "bf16", 989e12)
    monkeypatch.setattr(trainer_module, "device_peak", lambda precision: h100)
    monkeypatch.setattr(trainer_module.torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(trainer, "clock", lambda: now[0])
    monkeypatch.setattr(trainer, "train_batches", lambda: (([] for _ in iter(int, 1))))  # the fake step ignores them
    monkeypatch.setattr(trainer.step, "train", step)
    rec = RecurrenceConfig("poisson-lognormal", 3.0, 2, seed=5)
    monkeypatch.setattr(trainer, "run", dataclasses.replace(trainer.run, recurrence=rec))
    records = []
    monkeypatch.setattr(trainer.sinks, "print", lambda line: None)
    monkeypatch.setattr(trainer.sinks, "scalars", lambda step, values: records.append(values))
    start = trainer.iteration
    monkeypatch.setattr(trainer, "train", dataclasses.replace(
        trainer.train, train_iters=start + 4, log_interval=1, eval_interval=0, save_interval=None))
    trainer.fit(types.SimpleNamespace(save_dir=None))
    perf = [r for r in records if "perf/tokens_per_s" in r]
    assert len(perf) == 4  # one window per step
    tokens_per_step = run.train.global_batch_size * run.model.seq_length
    for w, r in enumerate(perf):
        draws = [draw_iterations(3.0, 5, start + w, i) for i in range(ACCUM)]
        executed = sum(flops_per_token(run.model, iterations=n, with_grad=min(n, 2)) for n in draws) / len(draws)
        assert r["perf/flops_per_token"] == pytest.approx(executed, rel=1e-12)
        assert r["perf/mfu"] == pytest.approx(tokens_per_step * executed / 989e12, rel=1e-12)
    assert len({r["perf/flops_per_token"] for r in perf}) > 1  # the steps drew different counts


@pytest.mark.parametrize("device,card,bf16", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12), ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835e12), ("NVIDIA H200", "H200 SXM", 989e12),
    ("NVIDIA GH200 480GB", "GH200", 989e12), ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100", 312e12), ("NVIDIA A10", "A10", 125e12), ("NVIDIA A10G", None, None)])
def test_peak_table_names_the_card(device, card, bf16):
    from mesh_megatron.training.metrics import device_peak

    peak = device_peak("bf16", device)
    if card is None:
        assert peak is None  # unknown: MFU '-', never another card's peak
        return
    assert (peak.card.name, peak.kind, peak.flops) == (card, "bf16", bf16)
    assert card in peak.describe(device) and device in peak.describe(device)
    # fp32 runs divide by the peak their matmuls can reach: tf32 tensor cores only when allowed.
    assert device_peak("fp32", device, allow_tf32=True).kind == "tf32"
    fp32 = device_peak("fp32", device, allow_tf32=False)
    assert fp32.kind == "fp32" and fp32.flops < peak.flops / 4


def test_overlapped_reduction_is_off_for_a_recomputed_shared_core(tmp_path):
    """An overlapping ZeRO-1 ds_config (fp32: DeepSpeed's ZeRO optimizer, not BF16_Optimizer):
    under --recompute a looped core's shared weights get their gradient once per recomputed
    iteration, which DeepSpeed's overlapped hooks refuse ("Gradient computed twice"): the run
    reduces after backward then. ZeRO-2 (examples/zero2.json) reduces in its hooks whatever
    overlap_comm says, so it is refused (one line naming zero1.json). Unshared layers (vanilla)
    keep the overlap. (The training test that caught it:
    tests/distributed/test_execution_parallel.py::test_recompute_loop_equals_none_in_training.)"""
    import json

    from mesh_megatron.config import ConfigError
    from mesh_megatron.training import arguments

    zero1_overlap = tmp_path / "zero1_overlap.json"
    ds = json.load(open(os.path.join(ROOT, "examples/zero1.json")))
    ds["zero_optimization"]["overlap_comm"] = True
    zero1_overlap.write_text(json.dumps(ds))

    def overlap(ds_config, *flags):
        run = arguments.parse(["--ds_config", str(ds_config), "--save", str(tmp_path / "s"), *flags],
                              world_size=1)
        return run.ds_config["zero_optimization"]["overlap_comm"]

    assert overlap(zero1_overlap) is True and overlap("examples/zero2.json") is True
    assert overlap(zero1_overlap, "--recompute", "loop") is False
    assert overlap(zero1_overlap, "--recompute", "layer") is False
    with pytest.raises(ConfigError, match="ZeRO stage 2 cannot recompute a looped core"):
        overlap("examples/zero2.json", "--recompute", "loop")
    assert overlap("examples/zero2.json", "--variant", "vanilla", "--layout", "6", "--recompute", "layer") is True
    assert overlap(zero1_overlap, "--variant", "vanilla", "--layout", "6", "--recompute", "layer") is True


def test_bf16_zero1_checkpoint_reshards_and_resumes_exactly(megatron_single, tmp_path):
    """bf16 at ZeRO-1 (examples/zero1.json, the recipes') is DeepSpeed's BF16_Optimizer, whose
    optimizer files are `bf16_zero_pp_rank_*` (checkpoint/reshard.py once looked for
    `zero_pp_rank_*` only and refused the checkpoint as 'no ZeRO-1/2 optimizer shards'). Saved
    after 2 steps, converted by tools/convert_checkpoint.py to the universal format, resumed
    into a fresh trainer: step 3 is the straight run's step 3, loss and gradient norm."""
    import glob
    import sys

    from mesh_megatron.checkpoint.manager import CheckpointManager, lineage
    from mesh_megatron.training.arguments import tokenizer_source

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_checkpoint

    straight, run = build_trainer(tmp_path / "a", "examples/zero1.json", ACCUM)
    resumed = None
    try:
        for seed in (0, 1):
            straight.train_step(batches(run, ACCUM, seed))
        save = str(tmp_path / "ckpt")
        straight._save(CheckpointManager(save, 2, run.parallel, *tokenizer_source(run.data),
                                         run_id=lineage(save, None)))
        assert [os.path.basename(p) for p in glob.glob(os.path.join(save, "iter_0000002", "*optim_states.pt"))] \
            == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        assert convert_checkpoint.main(["--load", save, "--save", str(tmp_path / "universal")]) == 0
        resumed, _ = build_trainer(tmp_path / "b", "examples/zero1.json", ACCUM)
        resumed.resume(str(tmp_path / "universal"), "iter_0000002")
        assert resumed.iteration == 2
        loss_a, _ = straight.train_step(batches(run, ACCUM, 2))
        loss_b, _ = resumed.train_step(batches(run, ACCUM, 2))
        # The same fp32 masters, Adam moments, step and LR position: the same step (bitwise here).
        assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=0)
        assert float(resumed.engine.get_global_grad_norm()) == \
            pytest.approx(float(straight.engine.get_global_grad_norm()), rel=1e-6, abs=0)
    finally:
        straight.engine.destroy()
        if resumed is not None:
            resumed.engine.destroy()
