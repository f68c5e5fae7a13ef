"""On a CUDA device: attention backends (and the class each builds), bf16, recompute with
dropout, the probe, and a DeepSpeed run (benchmarks/gpu_check.sh).

Skipped without CUDA. fp32 comparisons run with TF32 off, so kernels differ only by
reduction order: sdpa (memory-efficient / cuDNN kernels in fp32) vs local (explicit
softmax(q k^T) v) agree to ~1e-6 relative on these shapes; 1e-4 leaves room for the
accumulation order of a different kernel, far below any real bug (a wrong mask or scale
moves logits by O(1)).

Recompute vs none: rel 1e-6 for the loss and for gradients, the latter against the model's
largest gradient entry. Measured on an H100 (fp32, TF32 off): base within 1e-6 per tensor;
mesh's read-router bias off by 4.8e-6 of its own (small) size, identical for `loop` and
`layer`: recompute sums a state's gradient contributions in another order. A softmax router's bias gradient is a sum of
terms that cancel (the softmax Jacobian's rows sum to zero), which turns rounding-level
differences of the forward into a larger relative error; a real recompute bug (a wrong RNG
state, a stale input, a missing iteration) moves gradients by O(1) relative.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def build(variant, dtype=torch.float32, dropout=0.0, **execution):
    from mesh_megatron.config import ExecutionConfig, ModelConfig, to_transformer_config
    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.parallel.initialize import set_seed

    set_seed(0)  # megatron's tracked RNG (attention dropout, recompute) must exist
    # tiny width, 4 heads of 32 (head dim 32: a size every sdpa kernel takes), seq 256.
    layout = "6" if variant == "vanilla" else "1+2R2+1"
    cfg = ModelConfig(hidden_size=128, num_attention_heads=4, layout=layout, variant=variant,
                      vocab_size=512, seq_length=256, hidden_dropout=dropout, attention_dropout=dropout)
    model = MeshGPTModel(cfg, to_transformer_config(cfg, params_dtype=dtype),
                         execution=ExecutionConfig(**execution), init_seed=0)
    return model.to(device="cuda", dtype=dtype), cfg  # as DeepSpeed's bf16 engine casts it


def tokens(cfg, batch=2):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length + 1), generator=g)
    return t[:, :-1].cuda(), t[:, 1:].cuda()


def loss_and_grads(model, x, y, seed=None):
    """`seed`: reseed every generator first (set_seed: CPU, CUDA and megatron's CUDA RNG
    tracker), so two models draw the same dropout masks."""
    from mesh_megatron.parallel.initialize import set_seed

    if seed is not None:
        set_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=y).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_grads_close(g1, g2, rtol):
    assert g1.keys() == g2.keys()
    for name in g1:
        scale = g1[name].abs().max().clamp_min(1e-12)
        err = (g1[name] - g2[name]).abs().max() / scale
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol}"


@pytest.mark.parametrize("variant", ["vanilla", "base", "mesh"])
def test_sdpa_matches_local_on_cuda(megatron_single, variant):
    from mesh_megatron.model.attention import core_attention_names

    sdpa, cfg = build(variant, attention_backend="sdpa")
    local, _ = build(variant, attention_backend="local")
    # two kernels really run, not one twice
    assert (core_attention_names(sdpa), core_attention_names(local)) == (["SDPAttention"], ["DotProductAttention"])
    x, y = tokens(cfg)
    with torch.no_grad():
        a, b = sdpa(x), local(x)
    assert ((a - b).abs().max() / b.abs().max()) <= 1e-4
    la, ga = loss_and_grads(sdpa, x, y)
    lb, gb = loss_and_grads(local, x, y)
    assert abs(la.item() - lb.item()) <= 1e-4 * abs(lb.item())
    assert_grads_close(ga, gb, 1e-4)


def test_auto_and_te_build_transformer_engine_attention(megatron_single):
    """`auto` is Transformer Engine's core attention where it imports, else sdpa."""
    from mesh_megatron.model.attention import core_attention_names, transformer_engine_available

    auto, _ = build("mesh", attention_backend="auto")
    if transformer_engine_available():
        te, _ = build("mesh", attention_backend="te")
        assert core_attention_names(te) == core_attention_names(auto) == ["TEDotProductAttention"]
    else:
        assert core_attention_names(auto) == ["SDPAttention"]


def test_probe_on_cuda_equals_cpu(megatron_single, tmp_path):
    """tools/probe_mesh.py's probe on CUDA gives the CPU numbers (fp32: kernels differ, not the math)."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "unit"))
    from test_export import random_model, save_like_training, tiny
    from test_probe import SMALL, assert_same_probe

    from mesh_megatron.analysis.probe import ProbeSettings, run_probe

    cfg = tiny("mesh")
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    cpu = run_probe(str(tmp_path / "ckpt"), ProbeSettings(device="cpu", **SMALL))
    cuda = run_probe(str(tmp_path / "ckpt"), ProbeSettings(device="cuda", **SMALL))
    assert cuda["settings"]["device"] == "cuda"
    assert_same_probe(cuda, cpu, atol=1e-4)


@pytest.mark.parametrize("recompute", ["loop", "layer"])
@pytest.mark.parametrize("variant", ["base", "mesh"])
def test_recompute_matches_none_on_cuda(megatron_single, variant, recompute):
    """Dropout 0.1 (hidden and attention): the recomputed forward must replay the masks of
    the first, which on CUDA means megatron's checkpoint restoring the CUDA generator and the
    CUDA RNG tracker (sdpa's attention dropout draws inside its fork)."""
    from mesh_megatron.model.recursive_block import RecursiveBlock

    ref, cfg = build(variant, dropout=0.1, attention_backend="sdpa", recompute="none")
    rec, _ = build(variant, dropout=0.1, attention_backend="sdpa", recompute=recompute)
    x, y = tokens(cfg)
    l1, g1 = loss_and_grads(ref, x, y, seed=5)
    l2, g2 = loss_and_grads(rec, x, y, seed=5)
    # recompute really ran: 1+2R2+1 reruns prelude, 2 core iterations and coda as 4 blocks
    # (loop), or its 6 layer applications one by one (layer)
    assert sum(m.recomputed for m in rec.modules() if isinstance(m, RecursiveBlock)) == {"loop": 4, "layer": 6}[recompute]
    # dropout is really on: another seed, another loss
    other, _ = loss_and_grads(ref, x, y, seed=6)
    assert abs(other.item() - l1.item()) > 1e-4
    assert abs(l1.item() - l2.item()) <= 1e-6 * abs(l1.item())
    # rel 1e-6 against the model's largest gradient entry (the rule of the CPU test,
    # tests/unit/test_execution.py): cancelling router-bias sums are judged by the size of
    # their terms, not of their small sum.
    scale = max(g.abs().max() for g in g1.values())
    for name in g1:
        assert (g1[name] - g2[name]).abs().max() <= 1e-6 * scale, name


def test_bf16_step_is_finite_and_learns(megatron_single):
    """bf16 model + fp32 masters (the benchmark's and DeepSpeed's scheme): 5 steps on one batch."""
    model, cfg = build("mesh", dtype=torch.bfloat16, attention_backend="auto")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    params = list(model.parameters())
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(masters, lr=3e-3, fused=True)
    x, y = tokens(cfg)
    losses = []
    for _ in range(5):
        loss = model(x, labels=y).mean()
        assert loss.dtype == torch.float32  # cross entropy in fp32
        loss.backward()
        for p, m in zip(params, masters):
            assert torch.isfinite(p.grad).all()
            m.grad = p.grad.float()
            p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params, masters)
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_pythia160m_mesh_loss_falls(tmp_path, precision):
    """10 steps of `deepspeed --num_gpus 1 pretrain_mesh.py`, pythia-160m mesh, seq 512, in bf16
    and in fp16 (DeepSpeed's dynamic loss scaling: the first steps may overflow and be skipped
    while the scale comes down from 2^16; the logged loss stays finite and falls)."""
    bindir = os.path.dirname(shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed"))
    log = tmp_path / "log.jsonl"
    env = dict(os.environ, DS_BUILD_OPS="0", PATH=bindir + os.pathsep + os.environ["PATH"])
    cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", "1", "--master_port", str(29500 + os.getpid() % 1000),
           os.path.join(ROOT, "pretrain_mesh.py"), "--preset", "pythia-160m", "--variant", "mesh", f"--{precision}",
           "--seq-length", "512", "--micro-batch-size", "8", "--global-batch-size", "8",
           "--train-iters", "10", "--lr", "1e-3", "--lr-warmup-fraction", "0.1", "--log-interval", "1",
           "--eval-interval", "0", "--sample-tokens", "0", "--ds_config", "examples/zero1.json",
           "--data-cache-dir", str(tmp_path / "cache"),
           "--save", str(tmp_path / "ckpt"), "--log-jsonl", str(log)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    losses = [r["train/step_loss"] for r in map(json.loads, open(log)) if "train/step_loss" in r]
    assert len(losses) == 10 and all(map(torch.isfinite, map(torch.tensor, losses))), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert open(tmp_path / "ckpt" / "latest").read() == "iter_0000010"
