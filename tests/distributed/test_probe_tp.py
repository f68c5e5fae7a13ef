"""The probe on a checkpoint of a real TP=2 run (2 gloo processes): it merges the shards and
gives the same numbers as the probe of the same weights re-split to TP=1."""

import json
import os

import pytest
import torch

from launch import ROOT, run_workers

pytestmark = pytest.mark.distributed
FAST = ["--seq-length", "32", "--eval-interval", "0", "--log-interval", "1", "--sample-tokens", "0",
        "--train-iters", "2", "--micro-batch-size", "4", "--global-batch-size", "8"]


def test_tp2_probe_equals_tp1_probe_of_the_same_weights(megatron_single, tmp_path):
    import importlib.util

    from mesh_megatron.analysis.probe import ProbeSettings, run_probe

    tp2 = tmp_path / "tp2"
    run_workers(os.path.join(ROOT, "pretrain_mesh.py"), 2, FAST + [
        "--ds_config", "examples/zero1.json", "--tensor-model-parallel-size", "2", "--save", str(tp2)])
    tag = tp2 / "iter_0000002"
    assert (tag / "mp_rank_00_model_states.pt").exists() and (tag / "mp_rank_01_model_states.pt").exists()

    def tool(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    convert = tool("convert_checkpoint")
    tp1 = tmp_path / "tp1"
    assert convert.main(["--load", str(tp2), "--save", str(tp1), "--tensor-model-parallel-size", "1"]) == 0

    cli = tool("probe_mesh")
    out = tmp_path / "probe"
    assert cli.main(["--load", str(tp2), "--out", str(out), "--samples", "4", "--batch-size", "4"]) == 0
    sharded = json.loads((out / "probe.json").read_text())
    assert {"states", "relative_update", "cka", "spectrum", "routers"} <= set(sharded)
    assert sorted(p.name for p in out.glob("*.png")) == ["cka.png", "relative_update.png", "routers.png",
                                                          "spectrum.png", "state_rms.png"]
    merged = run_probe(str(tp1), ProbeSettings(samples=4, batch_size=4))

    def numbers(result):
        r = result["routers"]
        return torch.tensor([b["mean"] for b in result["relative_update"]] + sum(result["cka"], [])
                            + sum(result["spectrum"], []) + sum(r["write"], []) + sum(r["read"], []),
                            dtype=torch.float64)

    a, b = numbers(sharded), numbers(merged)
    assert torch.isfinite(a).all() and len(a) == 4 + 25 + 5 * 32 + 2 * 3 * 5
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert sharded["states"] == merged["states"] == ["h_emb", "h0", "h_1", "h_2", "h_out"]
