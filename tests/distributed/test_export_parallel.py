"""Export of checkpoints written by real multi-process runs (TP=2, ZeRO-2 over 2 ranks), and
an imported model that pretrain_mesh.py continues from."""

import json
import os

import pytest
import torch

from launch import ROOT, run_workers
from test_pipeline import convert

pytestmark = pytest.mark.distributed
SCRIPT = os.path.join(ROOT, "pretrain_mesh.py")
FAST = ["--seq-length", "32", "--eval-interval", "0", "--log-interval", "1", "--sample-tokens", "0",
        "--train-iters", "2", "--micro-batch-size", "4", "--global-batch-size", "8"]


def train(tmp_path, name, nprocs, extra):
    save = tmp_path / name
    out = run_workers(SCRIPT, nprocs, FAST + ["--save", str(save)] + extra)
    return save, out


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


IDS = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3))
WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")


def export_logits(save, out):
    """Export `save` and return the HF model's logits on IDS."""
    from transformers import AutoModelForCausalLM

    from mesh_megatron.conversion.to_hf import export_to_hf

    export_to_hf(str(save), str(out), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(IDS).logits


def training_logits(tmp_path, save, nprocs):
    """The reference: the training model itself, each TP rank holding its own mp_rank file
    (no merge code), logits gathered over the vocabulary (tp_worker.checkpoint_logits)."""
    torch.save(IDS, tmp_path / "ids.pt")
    out = tmp_path / f"{save.name}_logits.pt"
    run_workers(WORKER, nprocs, ["checkpoint_logits", str(save), str(tmp_path / "ids.pt"), str(out)])
    return torch.load(out)[..., :4096]  # the embedded tokenizer's 4096 = tiny's padded vocabulary


def test_tensor_parallel_and_zero2_checkpoints_export(megatron_single, tmp_path):
    tp2, _ = train(tmp_path, "tp2", 2, ["--ds_config", "examples/zero1.json", "--tensor-model-parallel-size", "2"])
    zero2, _ = train(tmp_path, "zero2", 2, ["--ds_config", "examples/zero2.json"])
    tag = tp2 / "iter_0000002"
    assert (tag / "mp_rank_00_model_states.pt").exists() and (tag / "mp_rank_01_model_states.pt").exists()
    assert json.loads((tag / "mesh_config.json").read_text())["parallel"]["tensor_model_parallel_size"] == 2

    merged = export_logits(tp2, tmp_path / "hf_tp2")
    sharded = export_logits(zero2, tmp_path / "hf_zero2")
    assert rel_err(merged, training_logits(tmp_path, tp2, 2)) <= 1e-5
    assert rel_err(sharded, training_logits(tmp_path, zero2, 1)) <= 1e-5
    # The TP=1 export of the same weights (re-split to TP=1 first) gives the same logits.
    convert(tp2, tmp_path / "tp1", "--tensor-model-parallel-size", "1", "--weights-only")
    assert rel_err(merged, export_logits(tmp_path / "tp1", tmp_path / "hf_tp1")) <= 1e-5


def test_imported_model_continues_training(megatron_single, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mesh_megatron.conversion.from_hf import import_from_hf

    torch.manual_seed(0)  # Pythia's settings; the embedded tokenizer's vocabulary of 4096
    config = GPTNeoXConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                           intermediate_size=256, rotary_pct=0.25, rotary_emb_base=10000,
                           max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False,
                           hidden_act="gelu")
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "pythia")
    report = import_from_hf(str(tmp_path / "pythia"), str(tmp_path / "ckpt"), layout="1+2R2+1", variant="mesh",
                            init="average", seq_length=32)
    assert "--config" in report.resume_command()

    save, out = train(tmp_path, "continued", 1, [
        "--ds_config", "examples/zero2.json", "--config", str(tmp_path / "ckpt" / "model.yaml"),
        "--load", str(tmp_path / "ckpt"), "--lr", "1e-4", "--min-lr", "1e-5"])
    assert "initialised weights from" in out[0] and "iter      2/2" in out[0]
    assert (save / "latest").read_text() == "iter_0000002"

    def module(path):
        states = torch.load(path, map_location="cpu", weights_only=False)["module"]
        return {k: v for k, v in states.items() if isinstance(v, torch.Tensor)}

    start = module(tmp_path / "ckpt" / "iter_0000000" / "mp_rank_00_model_states.pt")
    end = module(save / "iter_0000002" / "mp_rank_00_model_states.pt")
    assert start.keys() == end.keys()
    # Two Adam steps at lr <= 1e-4 move no weight by more than a few 1e-4: training went on
    # from the imported weights (a fresh init would be ~0.1 away), routers included.
    assert max((start[k] - end[k]).abs().max().item() for k in start) < 1e-3
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 0
