"""The trainer's AdamW (training/schedule.py): fused on CUDA only, same checkpoint contents."""

import torch

from mesh_megatron.config import TrainingConfig
from mesh_megatron.training.schedule import adamw, fused_adamw_for, keep_fused_choice

TRAIN = TrainingConfig(lr=1e-2, weight_decay=0.01)


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def steps(m, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        m(torch.randn(5, 8, generator=g)).square().mean().backward()
        opt.step()


def test_fused_only_for_cuda():
    assert fused_adamw_for(torch.device("cuda")) and fused_adamw_for(torch.device("cuda", 3))
    assert not fused_adamw_for(torch.device("cpu"))
    assert adamw(model(), TRAIN, fused=False).defaults["fused"] is None  # torch's default implementation
    opt = adamw(model(), TRAIN, fused=True)
    assert opt.defaults["fused"] and all(g["fused"] for g in opt.param_groups)
    # Decay on matrices only, as before.
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_checkpoint_of_either_implementation_loads_into_the_other(tmp_path):
    """A fused run's optimizer state (CPU has fused kernels in this torch) has the unfused
    one's format, loads into an unfused run, which keeps its own choice and its `step`
    counters on the host; the loaded run continues as the unfused run that wrote nothing."""
    fused_m, plain_m = model(), model()
    fused_opt, plain_opt = adamw(fused_m, TRAIN, fused=True), adamw(plain_m, TRAIN)
    steps(fused_m, fused_opt, 2, seed=1)
    steps(plain_m, plain_opt, 2, seed=1)
    fused_sd, plain_sd = fused_opt.state_dict(), plain_opt.state_dict()
    assert fused_sd["param_groups"][0].keys() == plain_sd["param_groups"][0].keys()
    assert fused_sd["state"].keys() == plain_sd["state"].keys()
    for i, s in plain_sd["state"].items():
        assert s.keys() == fused_sd["state"][i].keys()
        for k in s:
            assert s[k].shape == fused_sd["state"][i][k].shape and s[k].dtype == fused_sd["state"][i][k].dtype

    torch.save({"model": fused_m.state_dict(), "opt": fused_sd}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed_m = model(seed=5)
    resumed_m.load_state_dict(saved["model"])
    resumed_opt = adamw(resumed_m, TRAIN)
    resumed_opt.load_state_dict(saved["opt"])
    assert all(g["fused"] for g in resumed_opt.param_groups)  # torch takes the writer's choice...
    keep_fused_choice(resumed_opt, False)
    assert all(g["fused"] is None for g in resumed_opt.param_groups)  # ...the run keeps its own
    assert all(s["step"].device.type == "cpu" and s["step"].dtype == torch.float32
               for s in resumed_opt.state.values())
    steps(resumed_m, resumed_opt, 2, seed=2)
    steps(plain_m, plain_opt, 2, seed=2)
    for a, b in zip(resumed_m.parameters(), plain_m.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()

    # And the other way: an unfused checkpoint into a fused run.
    again = adamw(model(), TRAIN, fused=True)
    again.load_state_dict(plain_opt.state_dict())
    keep_fused_choice(again, True)
    assert all(g["fused"] for g in again.param_groups)
