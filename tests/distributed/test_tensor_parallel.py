"""Tensor parallelism 2 vs 1 on CPU (gloo): same logits, loss and gathered gradients."""

import os

import pytest
import torch

from launch import run_workers

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")
pytestmark = pytest.mark.distributed


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", ["vanilla", "base", "mesh"])
def test_tp2_matches_tp1(variant, tmp_path):
    run_workers(WORKER, 1, [variant, str(tmp_path)])
    run_workers(WORKER, 2, [variant, str(tmp_path)])
    ref = torch.load(tmp_path / f"result_{variant}_tp1.pt")
    tp2 = torch.load(tmp_path / f"result_{variant}_tp2.pt")

    assert ref["logits"].shape == tp2["logits"].shape
    assert (ref["logits"] - tp2["logits"]).abs().max() <= 1e-5 * max(1.0, ref["logits"].abs().max())
    assert abs(ref["loss"].item() - tp2["loss"].item()) <= 1e-5
    assert ref["grads"].keys() == tp2["grads"].keys()
    for name, g in ref["grads"].items():
        assert g.shape == tp2["grads"][name].shape, name
        assert (g - tp2["grads"][name]).abs().max() <= 1e-5, (name, _rel_err(tp2["grads"][name], g))
    if variant == "mesh":  # the routers are replicated across TP ranks and still learn
        assert any("write_routers" in n for n in ref["grads"])
