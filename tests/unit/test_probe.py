"""The probe (mesh_megatron/analysis, tools/probe_mesh.py): metrics with known answers, the
states it reads against the training model's own, and the tool end to end on tiny models.

Checkpoints are written in-process as CheckpointManager lays them out (helpers of
test_export.py); tests/distributed/test_probe_tp.py probes a real TP=2 run.
"""

import json
import math
import os

import pytest
import torch

from mesh_megatron.analysis import metrics
from mesh_megatron.analysis.probe import ProbeSettings, load_model, run_probe, write_probe
from mesh_megatron.analysis.states import StateReader
from mesh_megatron.conversion.to_hf import export_to_hf
from mesh_megatron.config import VARIANTS, ConfigError
from test_export import ROOT, SEQ, random_model, save_like_training, tiny, token_ids

KEYS = ("states", "relative_update", "cka", "spectrum", "state_rms", "routers")
SMALL = dict(samples=4, batch_size=2)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# metrics on synthetic inputs


def test_cka_of_a_state_with_itself_is_one_and_symmetric():
    x = torch.randn(3, 40, 16, generator=gen(0), dtype=torch.float64)
    torch.testing.assert_close(metrics.cka(x, x), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    y = torch.tanh(x @ torch.randn(16, 24, generator=gen(1), dtype=torch.float64))
    z = torch.randn(3, 40, 8, generator=gen(2), dtype=torch.float64)
    m = metrics.cka_matrix([x, y, z])
    assert m.shape == (3, 3, 3)
    torch.testing.assert_close(m, m.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(torch.diagonal(m, dim1=1, dim2=2), torch.ones(3, 3, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # a related state is more similar than an unrelated one, and neither is 1
    assert (m[:, 0, 1] > m[:, 0, 2] + 0.1).all() and (m[:, 0, 1] < 0.99).all()


def test_cka_is_invariant_to_rotations_and_isotropic_scaling():
    x = torch.randn(2, 48, 12, generator=gen(3), dtype=torch.float64)
    y = torch.relu(x @ torch.randn(12, 20, generator=gen(4), dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen(5), dtype=torch.float64))
    reference = metrics.cka(x, y)
    assert (reference < 0.99).all()
    for transformed in (x @ q, 37.0 * x, 1e-3 * (x @ q)):
        torch.testing.assert_close(metrics.cka(transformed, y), reference, rtol=0, atol=1e-10)
    # but not to an anisotropic scaling: the test above can fail
    stretched = x * torch.tensor([50.0] + [1.0] * 11, dtype=torch.float64)
    assert (metrics.cka(stretched, y) - reference).abs().max() > 1e-3


def test_rbf_bandwidth_is_the_median_pairwise_distance():
    # 3 tokens on a line at 0, 1, 3: squared distances 1, 9, 4 -> median 4 = sigma^2
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    k = metrics.rbf_gram(x)[0]
    expected = torch.exp(-torch.tensor([[0, 1, 9], [1, 0, 4], [9, 4, 0]], dtype=torch.float64) / 8.0)
    torch.testing.assert_close(k, expected, rtol=0, atol=1e-15)


def test_relative_update_known_values():
    h = torch.randn(4, 10, 8, generator=gen(6), dtype=torch.float64)
    torch.testing.assert_close(metrics.relative_update(h, h), torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(metrics.relative_update(h, -h), torch.full((4,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(metrics.relative_update(h, 2 * h), torch.full((4,), 2 / 3, dtype=torch.float64))
    # one sequence [s, h] is a batch of one
    assert metrics.relative_update(h[0], 3 * h[0]).shape == (1,)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rank_r_state_has_r_nonzero_normalised_singular_values(rank):
    a = torch.randn(60, rank, generator=gen(rank), dtype=torch.float64)
    x = a @ torch.randn(rank, 32, generator=gen(10 + rank), dtype=torch.float64)  # [s=60, h=32], rank r
    sv = metrics.normalized_spectrum(x, top=50)[0]
    assert sv.shape == (32,)  # min(top, s, h)
    assert sv[0] == 1.0 and (sv[:-1] >= sv[1:]).all()
    assert int((sv > 1e-10).sum()) == rank
    assert metrics.normalized_spectrum(x, top=5).shape == (1, 5)


# -----------------------------------------------------------------------------
# the states the probe reads


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "vanilla"])
def test_states_and_routers_equal_the_training_model(megatron_single, tmp_path, variant):
    """Every looped variant: the states (and MeSH router weights) the probe reads from the
    Hugging Face model of a checkpoint are the training model's own (its observe= hook)."""
    cfg = tiny(variant)
    model = random_model(cfg)
    save_like_training(tmp_path / "ckpt", cfg, model.state_dict(), tokenizer=False)
    reader = StateReader(load_model(str(tmp_path / "ckpt")).model)
    assert reader.variant == variant
    assert reader.names == ["h_emb", "h0", "h_1", "h_2", "h_out"]
    assert reader.router_steps == (["transitional", "loop 1", "loop 2"] if cfg.is_mesh else [])
    assert reader.slots == (5 if cfg.is_mesh else 0)

    ids, seen, hooks = token_ids(), {}, []
    if cfg.is_mesh:
        routers = model.block.state_passing
        hooks = [r.register_forward_hook(lambda m, i, out, key=(k, s): seen.__setitem__(key, out))
                 for k, group in (("write", routers.write_routers), ("read", routers.read_routers))
                 for s, r in enumerate(group)]
    with torch.no_grad():
        model(ids, observe=lambda name, h: seen.__setitem__(name, h.transpose(0, 1)))  # [s, b, h] -> [b, s, h]
    for h in hooks:
        h.remove()
    capture = reader(ids)
    for name, state in zip(reader.names, capture.states):
        key = {"h_1": "h1", "h_2": "h2"}.get(name, name)
        torch.testing.assert_close(state, seen[key], rtol=1e-5, atol=1e-5)
    assert len(capture.write) == len(capture.read) == len(reader.router_steps)
    for s in range(len(reader.router_steps)):
        for which, got in (("write", capture.write), ("read", capture.read)):
            torch.testing.assert_close(got[s], seen[(which, s)].transpose(0, 1), rtol=1e-5, atol=1e-6)
            # a softmax over the slots: every token's weights sum to 1
            torch.testing.assert_close(got[s].sum(-1), torch.ones(2, SEQ), rtol=0, atol=1e-6)
            assert got[s].max(-1).values.mean() < 0.9  # the random routers are far from one-hot


# -----------------------------------------------------------------------------
# the probe end to end


def check_result(result, n_states, routers):
    assert all(k in result for k in KEYS)
    n = len(result["states"])
    assert n == n_states and len(result["relative_update"]) == n - 1
    assert len(result["cka"]) == n and all(len(row) == n for row in result["cka"])
    assert len(result["spectrum"]) == n
    assert [r["state"] for r in result["state_rms"]] == result["states"]
    assert all(r["mean"] > 0 and math.isfinite(r["std"]) for r in result["state_rms"])
    values = [b["mean"] for b in result["relative_update"]] + sum(result["cka"], []) + sum(result["spectrum"], [])
    assert all(math.isfinite(v) for v in values)
    assert all(abs(result["cka"][i][i] - 1) < 1e-9 for i in range(n))
    assert all(abs(row[0] - 1) < 1e-12 for row in result["spectrum"])
    if routers:
        r = result["routers"]
        assert len(r["write"]) == len(r["read"]) == len(r["steps"])
        for row in r["write"] + r["read"]:  # mean of per-token distributions: still sums to 1
            assert len(row) == r["slots"] and abs(sum(row) - 1) < 1e-6 and min(row) >= 0
    else:
        assert result["routers"] is None


def assert_same_probe(a, b, atol):
    assert a["states"] == b["states"]
    for key in ("cka", "spectrum"):
        torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=0, atol=atol)
    torch.testing.assert_close(torch.tensor([x["mean"] for x in a["relative_update"]]),
                               torch.tensor([x["mean"] for x in b["relative_update"]]), rtol=0, atol=atol)
    if a["routers"] or b["routers"]:
        for key in ("write", "read"):
            torch.testing.assert_close(torch.tensor(a["routers"][key]), torch.tensor(b["routers"][key]),
                                       rtol=0, atol=atol)


def probe_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_mesh", os.path.join(ROOT, "tools", "probe_mesh.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_probe_cli_on_checkpoint_equals_probe_of_its_export(megatron_single, tmp_path, capsys):
    cfg = tiny("mesh")
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)

    cli, out = probe_cli(), tmp_path / "probe"
    assert cli.main(["--load", str(tmp_path / "ckpt"), "--out", str(out), "--samples", "4", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "relative update: prelude" in printed and "wrote" in printed
    for name in ("relative_update.png", "cka.png", "spectrum.png", "state_rms.png", "routers.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    from_ckpt = json.loads((out / "probe.json").read_text())
    check_result(from_ckpt, 5, routers=True)
    assert from_ckpt["data"] == {"source": "embedded corpus, validation split of 969,30,1", "samples": 4,
                                 "seq_length": SEQ, "seed": 1234}
    assert from_ckpt["model"]["variant"] == "mesh" and from_ckpt["model"]["layout"] == "1+2R2+1"
    assert not list(out.glob("*.tmp*"))

    from_hf = run_probe(str(tmp_path / "hf"), ProbeSettings(**SMALL))
    assert_same_probe(from_hf, from_ckpt, atol=1e-6)

    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert cli.main(["--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out {tmp_path / 'file'}: is a file, not a directory; pass a directory path"]


def test_vanilla_layout_reads_the_matched_depths(megatron_single, tmp_path):
    cfg = tiny("vanilla")  # 6 layers
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    per_layer = run_probe(str(tmp_path / "ckpt"), ProbeSettings(**SMALL))
    check_result(per_layer, 7, routers=False)
    assert per_layer["states"] == ["h_emb", "layer_1", "layer_2", "layer_3", "layer_4", "layer_5", "h_out"]
    grouped = run_probe(str(tmp_path / "ckpt"), ProbeSettings(vanilla_layout="1+2R2+1", **SMALL))
    check_result(grouped, 5, routers=False)
    assert [b["block"] for b in grouped["relative_update"]] == ["prelude", "block 1", "block 2", "coda"]
    # h0 = after layer 1, h_1 = after layer 3, h_2 = after layer 5: the same numbers
    pick = [0, 1, 3, 5, 6]
    cka = torch.tensor(per_layer["cka"])[pick][:, pick]
    torch.testing.assert_close(torch.tensor(grouped["cka"]), cka, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor(grouped["spectrum"]), torch.tensor(per_layer["spectrum"])[pick],
                               rtol=0, atol=1e-12)
    # the in-memory GPT-NeoX (rotary tables rebuilt) equals transformers' load of the export
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    assert_same_probe(run_probe(str(tmp_path / "hf"), ProbeSettings(vanilla_layout="1+2R2+1", **SMALL)), grouped,
                      atol=1e-6)
    paths = write_probe(grouped, str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in paths) == ["cka.png", "probe.json", "relative_update.png",
                                                          "spectrum.png", "state_rms.png"]


def test_base_probe_has_no_routers(megatron_single, tmp_path):
    cfg = tiny("base")
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    result = run_probe(str(tmp_path / "ckpt"), ProbeSettings(samples=2, batch_size=2, seq_length=16))
    check_result(result, 5, routers=False)
    assert result["data"]["seq_length"] == 16


def test_bad_inputs_each_give_one_clear_error(megatron_single, tmp_path):
    cfg = tiny("mesh")
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    ckpt = str(tmp_path / "ckpt")
    cases = [
        (str(tmp_path / "nothing"), ProbeSettings(), "nothing: does not exist"),
        (str(tmp_path), ProbeSettings(), "holds neither a training checkpoint"),
        (ckpt, ProbeSettings(seq_length=SEQ * 2), "longer than the 32 tokens"),
        (ckpt, ProbeSettings(vanilla_layout="1+2R2+1"), "for vanilla models only"),
        (ckpt, ProbeSettings(samples=0), "--samples must be >= 1"),
        (ckpt, ProbeSettings(data_path=[str(tmp_path / "missing")], **SMALL), "missing"),
    ]
    if not torch.cuda.is_available():
        cases.append((ckpt, ProbeSettings(device="cuda"), "sees no GPU"))
    for load, settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_probe(load, settings)


def test_state_rms_at_init_equals_the_training_model_and_the_uniform_router_prediction(megatron_single, tmp_path):
    """`--init-only`: the probe's state RMS (via the Hugging Face model) equals sqrt(mean h^2) of
    the training model's own states (`observe=`), at iteration 0 of the run the flags describe.

    At the paper's router init the routers are near uniform (r_b = 1/B + a_b, w_b = 1/B + c_b,
    sum a = sum c = 0), so h0 = r_0 h_emb + (r . w) h_pre with r . w = 1/B + sum_b a_b c_b:
    h0 = (h_emb + h_pre) / B + e, |e| <= d_r |h_emb| + B d_r d_w |h_pre| per token (d = max |a|,
    max |c|), and so |RMS(h0) - RMS((h_emb + h_pre) / B)| <= d_r RMS(h_emb) + B d_r d_w RMS(h_pre)."""
    from mesh_megatron.analysis.probe import held_out_tokens, model_at_init
    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.config import preset, to_transformer_config

    flags = ["--variant", "mesh", "--seed", "77"]
    settings = ProbeSettings(samples=4, batch_size=4, init_flags=flags)
    result = run_probe(None, settings)
    assert result["model"]["iteration"] == 0 and result["model"]["source"].startswith("initialisation of")
    tokens, _ = held_out_tokens(model_at_init(flags), settings, result["data"]["seq_length"])

    cfg = preset("tiny", "mesh", seq_length=result["data"]["seq_length"])
    model = MeshGPTModel(cfg, to_transformer_config(cfg), init_seed=77).eval()
    seen, routed = {}, {}
    sp = model.block.state_passing
    sp.write_routers[0].register_forward_hook(lambda m, i, o: routed.__setitem__("w", o))
    sp.read_routers[0].register_forward_hook(lambda m, i, o: routed.__setitem__("r", o))
    with torch.no_grad():
        h_emb = model.embed(tokens)
        model(tokens, observe=lambda name, h: seen.__setitem__(name, h))  # states [s, b, h]
    seen["h_emb"] = h_emb
    rms = lambda x: x.double().pow(2).mean(dim=(0, 2)).sqrt()  # noqa: E731  per sequence, [b]

    probed = {r["state"]: r["mean"] for r in result["state_rms"]}
    for probe_name, name in (("h_emb", "h_emb"), ("h0", "h0"), ("h_1", "h1"), ("h_2", "h2")):
        assert probed[probe_name] == pytest.approx(rms(seen[name]).mean().item(), rel=1e-5), probe_name

    B = cfg.slots
    a, c = routed["r"] - 1 / B, routed["w"] - 1 / B  # [s, b, B] deviations from uniform
    # e = h0 - (h_emb + h_pre) / B = a_0 h_emb + (sum_b a_b c_b) h_pre, per token ([s, b, 1] factors)
    a0, ac = a[..., :1], (a * c).sum(-1, keepdim=True)
    bound = rms(a0.abs() * seen["h_emb"].abs() + ac.abs() * seen["h_pre"].abs()).mean().item()
    predicted = rms((seen["h_emb"] + seen["h_pre"]) / B).mean().item()
    assert abs(probed["h0"] - predicted) <= bound
    assert bound < 0.25 * predicted  # near uniform: h0 is about (h_emb + h_pre) / B


def test_probe_at_another_depth(megatron_single, tmp_path):
    """--num-loops N probes N loop states (shared MeSH routers: N + 1 router steps, each one's
    weights the routers' output at that step); per-step weights refuse N > K."""
    cfg = tiny("mesh", mesh_routers="shared", mesh_step_embedding=True, mesh_slots=5)
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    result = run_probe(str(tmp_path / "ckpt"), ProbeSettings(num_loops=4, **SMALL))
    check_result(result, 7, routers=True)
    assert result["states"] == ["h_emb", "h0", "h_1", "h_2", "h_3", "h_4", "h_out"]
    assert len(result["routers"]["write"]) == 5 and result["model"]["trained_num_loops"] == 2
    assert result["model"]["layout"] == "1+2R4+1"
    per_step = tiny("mesh")
    save_like_training(tmp_path / "ps", per_step, random_model(per_step).state_dict())
    with pytest.raises(ConfigError, match="runs 1..2 loop iterations"):
        run_probe(str(tmp_path / "ps"), ProbeSettings(num_loops=3, **SMALL))
