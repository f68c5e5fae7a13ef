"""Hugging Face export and import (mesh_megatron/conversion, tools/convert_*_hf.py), evaluation
(mesh_megatron/evaluation.py, tools/eval_lm.py).

Checkpoints here are written in-process in the layout CheckpointManager produces (DeepSpeed's
mp_rank_XX_model_states.pt with a "module" dict, mesh_config.json, tokenizer/, latest);
tests/distributed/test_export_parallel.py exports checkpoints written by real training runs.
"""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from launch import run_script
from mesh_megatron.conversion.to_hf import export_to_hf
from mesh_megatron.conversion.from_hf import import_from_hf, layer_sources
from mesh_megatron.conversion.key_map import from_hf_name, to_hf_name
from mesh_megatron.checkpoint.reader import open_checkpoint, read_model_state
from mesh_megatron.checkpoint.skeleton import build_model
from mesh_megatron.config import VARIANTS, ConfigError, ModelConfig, preset, to_transformer_config
from mesh_megatron.data.embedded import EMBEDDED_TOKENIZER_MODEL
from mesh_megatron.model import MeshGPTModel
from mesh_megatron.parallel.initialize import set_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 32


# -----------------------------------------------------------------------------
# helpers


def tiny(variant, **overrides):
    return preset("tiny", variant, seq_length=SEQ, **overrides)


def random_model(cfg, seed=0):
    """A training model whose biases, norms, routers and scalars are all non-trivial."""
    set_seed(seed)
    model = MeshGPTModel(cfg, to_transformer_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_routers." in name:
                p.normal_(0.0, 0.3)  # far from uniform routing
            elif p.ndim == 1 or "scalars" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_like_training(ckpt, cfg, state, iteration=3, tp=1, tokenizer=True):
    """The files CheckpointManager.save leaves (DeepSpeed's module dict per mp rank)."""
    tag = f"iter_{iteration:07d}"
    d = ckpt / tag
    d.mkdir(parents=True)
    states = state if isinstance(state, list) else [state]
    for rank, module in enumerate(states):
        torch.save({"module": module, "iteration": iteration, "dp_world_size": 1, "mp_world_size": tp},
                   d / f"mp_rank_{rank:02d}_model_states.pt")
    meta = {"model": dataclasses.asdict(cfg), "iteration": iteration,
            "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1}}
    if tokenizer:
        (d / "tokenizer").mkdir()
        shutil.copyfile(EMBEDDED_TOKENIZER_MODEL, d / "tokenizer" / "tokenizer.model")
        meta["tokenizer"] = {"type": "sentencepiece", "file": "tokenizer/tokenizer.model"}
    (d / "mesh_config.json").write_text(json.dumps(meta))
    (ckpt / "latest").write_text(tag)
    return ckpt


def token_ids(vocab=4096, batch=2, seq=SEQ, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def load_hf(path, remote=True):
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": True} if remote else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


# -----------------------------------------------------------------------------
# key map


def test_key_map_round_trips_every_name(megatron_single):
    for variant in VARIANTS:
        cfg = tiny(variant)
        model = MeshGPTModel(cfg, to_transformer_config(cfg, perform_initialization=False))
        names = [n for n in model.state_dict() if not n.endswith("_extra_state")]
        hf = [to_hf_name(n, cfg) for n in names]
        assert len(set(hf)) == len(names), variant
        assert [from_hf_name(h, cfg) for h in hf] == names, variant
    cfg = tiny("vanilla+mesh")  # 1+2R2+1 unrolled: core holds 4 layers -> HF 1..4, coda -> 5
    assert to_hf_name("block.core.3.self_attention.linear_qkv.weight", cfg) == \
        "gpt_neox.layers.4.attention.query_key_value.weight"
    assert to_hf_name("block.coda.0.mlp.linear_fc2.bias", cfg) == "gpt_neox.layers.5.mlp.dense_4h_to_h.bias"
    assert to_hf_name("block.state_passing.read_routers.2.weight", cfg) == "gpt_neox.mesh.read_routers.2.weight"
    assert to_hf_name("output_layer._extra_state", cfg) is None
    assert from_hf_name("lm_head.weight", cfg) == "output_layer.weight"
    with pytest.raises(ConfigError, match="beyond the 6 unique layers"):
        from_hf_name("gpt_neox.layers.6.input_layernorm.weight", cfg)


# -----------------------------------------------------------------------------
# export parity, every variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_parity_every_variant(megatron_single, tmp_path, variant):
    cfg = tiny(variant)
    model = random_model(cfg)
    save_like_training(tmp_path / "ckpt", cfg, model.state_dict())
    out = tmp_path / "hf"
    report = export_to_hf(str(tmp_path / "ckpt"), str(out), progress=False)

    vanilla = variant == "vanilla"
    assert report.model_type == ("gpt_neox" if vanilla else "mesh_gpt_neox")
    assert (out / "modeling_mesh.py").exists() != vanilla and (out / "configuration_mesh.py").exists() != vanilla
    saved = json.loads((out / "config.json").read_text())
    assert saved["vocab_size"] == 4096 and saved["max_position_embeddings"] == SEQ
    if vanilla:  # the sqrt(h) multiplier is folded into embed_in
        assert "auto_map" not in saved and "embedding_multiplier" not in saved
        emb = load_file(str(out / "model.safetensors"))["gpt_neox.embed_in.weight"]
        torch.testing.assert_close(emb, model.embedding.word_embeddings.weight.detach() * 8.0, rtol=0, atol=0)
    else:
        assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_mesh.MeshGPTNeoXForCausalLM"
        assert saved["embedding_multiplier"] == 8.0 and saved["state_passing"] == variant

    hf = load_hf(out, remote=not vanilla)  # vanilla: plain transformers, no remote code
    if vanilla:
        assert type(hf).__module__.startswith("transformers.models.gpt_neox")
    ids = token_ids()
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids)) <= 1e-5


def test_export_files_tokenizer_and_generation_config(megatron_single, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    cfg = tiny("mesh")
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    out = tmp_path / "hf"
    export_to_hf(str(tmp_path / "ckpt"), str(out), progress=False)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(out))
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)  # the embedded sentencepiece model's
    tok = AutoTokenizer.from_pretrained(out)  # offline, no sentencepiece involved
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    readme = open(os.path.join(ROOT, "README.md")).read()[:2000]
    for text in ("Hello  world\n  def f(x): return x**2", " naïve café 12345", readme):
        assert tok(text)["input_ids"] == sp.encode(text)
    assert tok.eos_token_id == 2


def test_export_iteration_and_dtype(megatron_single, tmp_path):
    """--iteration picks an older tag; bf16 checkpoints export, and --dtype casts."""
    cfg = tiny("anchor")
    model = random_model(cfg)
    bf16 = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    ckpt = save_like_training(tmp_path / "ckpt", cfg, bf16, iteration=2)
    save_like_training(tmp_path / "other", cfg, random_model(cfg, seed=1).state_dict(), iteration=4)
    shutil.copytree(tmp_path / "other" / "iter_0000004", ckpt / "iter_0000004")
    (ckpt / "latest").write_text("iter_0000004")

    export_to_hf(str(ckpt), str(tmp_path / "bf16"), iteration=2, progress=False)
    export_to_hf(str(ckpt), str(tmp_path / "fp32"), iteration=2, dtype="fp32", progress=False)
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["embed_out.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # the fp32 export equals a TP=1 model holding the bf16 weights, in fp32
    reference = build_model(cfg, read_model_state(open_checkpoint(str(ckpt), 2), dtype=torch.float32))
    ids = token_ids()
    with torch.no_grad():
        assert rel_err(load_hf(tmp_path / "fp32")(ids).logits, reference(ids)) <= 1e-5
        assert rel_err(load_hf(tmp_path / "bf16")(ids).logits, reference(ids)) <= 5e-2  # bf16 compute


def test_convert_to_hf_cli(megatron_single, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_to_hf", os.path.join(ROOT, "tools/convert_to_hf.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg = tiny("base")
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    argv = ["--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "fp32", "--quiet"]
    assert cli.main(argv) == 0
    assert "mesh_gpt_neox" in capsys.readouterr().out
    assert cli.main(argv) == 2  # --out is not empty now
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out {tmp_path / 'hf'}: is not empty; pass an empty or new directory, or --force to replace "
        "it (the old contents go only once the new output is complete)"]
    assert cli.main(argv + ["--force"]) == 0
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--load", "--out", "--iteration", "--dtype", "--force", "--quiet"):
        assert flag in help_text


# -----------------------------------------------------------------------------
# import


def random_pythia(path, vocab=512, layers=6, seed=0):
    """transformers' GPTNeoXForCausalLM with Pythia's settings, random non-trivial weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=256, rotary_pct=0.25, rotary_emb_base=10000,
                           max_position_embeddings=SEQ, use_parallel_residual=True, tie_word_embeddings=False,
                           hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def test_import_pythia_reproduces_transformers_logits(megatron_single, tmp_path):
    pythia = random_pythia(tmp_path / "pythia")
    report = import_from_hf(str(tmp_path / "pythia"), str(tmp_path / "ckpt"))
    assert report.model.variant == "vanilla" and report.model.layout == "6"
    assert report.model.scale_embeddings is False  # Pythia has no embedding multiplier
    meta = json.loads((tmp_path / "ckpt" / "iter_0000000" / "mesh_config.json").read_text())
    assert meta["weights_only"] is True and meta["model"]["scale_embeddings"] is False
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000000"

    ckpt = open_checkpoint(str(tmp_path / "ckpt"))
    model = build_model(ckpt.model, read_model_state(ckpt))
    ids = token_ids(vocab=512)
    with torch.no_grad():
        assert rel_err(model(ids), pythia(ids).logits) <= 1e-5


def test_import_legacy_pythia_layout(megatron_single, tmp_path):
    """Pythia as on the Hub: rotary_pct / rotary_emb_base in config.json, pytorch_model.bin with
    the old causal-mask and rotary buffers."""
    pythia = random_pythia(tmp_path / "saved")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (legacy / "config.json").write_text(json.dumps(config))
    state = load_file(str(tmp_path / "saved" / "model.safetensors"))
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
               legacy / "pytorch_model.bin")  # fp16, as the Hub's
    report = import_from_hf(str(legacy), str(tmp_path / "ckpt"))
    assert (report.model.rotary_percent, report.model.rotary_base) == (0.25, 10000)
    model = build_model(report.model, read_model_state(open_checkpoint(str(tmp_path / "ckpt"))))
    pythia.half().float()  # the same fp16 rounding
    ids = token_ids(vocab=512)
    with torch.no_grad():
        assert rel_err(model(ids), pythia(ids).logits) <= 1e-5


def test_import_recursive_init(megatron_single, tmp_path):
    random_pythia(tmp_path / "pythia")  # 6 layers -> 1+2R2+1: middle block M = layers 1..4
    cfg = ModelConfig(layout="1+2R2+1", variant="base")
    assert layer_sources(6, cfg, "stepwise") == [[0], [1], [3], [5]]  # core j <- M[j*K]
    assert layer_sources(6, cfg, "average") == [[0], [1, 3], [2, 4], [5]]  # core j <- mean_t M[t*C + j]
    assert layer_sources(6, cfg, "lower") == [[0], [1], [2], [5]]  # core j <- M[j]
    assert layer_sources(6, dataclasses.replace(cfg, variant="vanilla+mesh"), "stepwise") == [[i] for i in range(6)]
    with pytest.raises(ConfigError, match="runs 4 layers but the source has 6"):
        layer_sources(6, ModelConfig(layout="1+1R2+1", variant="base"), "stepwise")

    source = load_file(str(tmp_path / "pythia" / "model.safetensors"))
    report = import_from_hf(str(tmp_path / "pythia"), str(tmp_path / "ckpt"), layout="1+2R2+1",
                            variant="mesh", init="average")
    state = read_model_state(open_checkpoint(str(tmp_path / "ckpt")))
    expected = (source["gpt_neox.layers.2.attention.query_key_value.weight"]
                + source["gpt_neox.layers.4.attention.query_key_value.weight"]) / 2
    torch.testing.assert_close(state["block.core.1.self_attention.linear_qkv.weight"], expected)
    torch.testing.assert_close(state["block.coda.0.mlp.linear_fc1.bias"],
                               source["gpt_neox.layers.5.mlp.dense_h_to_4h.bias"])
    router = state["block.state_passing.write_routers.0.weight"]  # fresh, the training init
    assert router.shape == (5, 64) and 0.5 < router.std().item() / (2 / (5 * 64)) ** 0.5 < 1.5
    assert report.model.variant == "mesh" and report.model.scale_embeddings is False


def test_round_trip_export_import_export_is_identical(megatron_single, tmp_path):
    """Also: a MeSH trained with --mesh-router-init base records it in the export's config and
    the imported checkpoint's ModelConfig (the exported forward does not read it)."""
    rinit = dict(mesh_router_init="base", mesh_router_margin=6.0)
    shared = dict(mesh_routers="shared", mesh_step_embedding=True)
    inject = dict(input_injection="concat-adapter", state_init="noise")
    for variant in ("mesh", "vanilla", "learned", "mesh-rinit", "mesh-shared", "base-inject"):
        cfg = tiny("mesh", **rinit) if variant == "mesh-rinit" else \
            tiny("mesh", **shared) if variant == "mesh-shared" else \
            tiny("base", **inject) if variant == "base-inject" else tiny(variant)
        save_like_training(tmp_path / variant / "ckpt", cfg, random_model(cfg).state_dict())
        first, again = tmp_path / variant / "hf1", tmp_path / variant / "hf2"
        export_to_hf(str(tmp_path / variant / "ckpt"), str(first), progress=False)
        import_from_hf(str(first), str(tmp_path / variant / "ckpt2"))
        export_to_hf(str(tmp_path / variant / "ckpt2"), str(again), progress=False)
        a, b = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
        assert a.keys() == b.keys(), variant
        assert all(torch.equal(a[k], b[k]) for k in a), variant
        c1, c2 = (json.loads((d / "config.json").read_text()) for d in (first, again))
        assert c1 == c2, variant
        if variant == "mesh-rinit":
            assert (c1["mesh_router_init"], c1["mesh_router_margin"]) == ("base", 6.0)
            imported = open_checkpoint(str(tmp_path / variant / "ckpt2")).model
            assert (imported.mesh_router_init, imported.mesh_router_margin) == ("base", 6.0)


def test_exported_shared_mesh_equals_training_model_at_any_depth(megatron_single, tmp_path):
    """mesh with shared routers and a step embedding, exported from K = 2: the HF model at
    num_loops N = 1, K, 2K equals the training model built with layout 1+2R{N}+1 holding the
    same weights (no weight depends on K once mesh_slots is fixed: its default K + 3 is not),
    and the config records the routers."""
    cfg = tiny("mesh", mesh_routers="shared", mesh_step_embedding=True, mesh_slots=5)
    model = random_model(cfg)
    with torch.no_grad():
        model.block.state_passing.step_embedding.normal_(0.0, 1.0)
    save_like_training(tmp_path / "ckpt", cfg, model.state_dict())
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (saved["mesh_routers"], saved["mesh_step_embedding"]) == ("shared", True)
    hf = load_hf(tmp_path / "hf")
    ids = token_ids()
    outs = []
    for n in (1, 2, 4):
        deep = MeshGPTModel(dataclasses.replace(cfg, layout=f"1+2R{n}+1"), to_transformer_config(cfg)).eval()
        deep.load_state_dict(model.state_dict())
        with torch.no_grad():
            ref, got = deep(ids), hf(ids, num_loops=n).logits
        assert rel_err(got, ref) <= 1e-5, n
        outs.append(got)
    assert rel_err(outs[0], outs[2]) > 1e-2  # the depth changes the output


# -----------------------------------------------------------------------------
# evaluation


def test_perplexity_matches_training_model_loss(megatron_single, tmp_path):
    from mesh_megatron.evaluation import perplexity
    from mesh_megatron.data.datasets import build_gpt_datasets
    from mesh_megatron.data.embedded import embedded_prefix, embedded_tokenizer, prepare_embedded_dataset
    from mesh_megatron.data.sampler import collate

    cfg = tiny("mesh")
    model = random_model(cfg)
    save_like_training(tmp_path / "ckpt", cfg, model.state_dict())
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    cache = str(tmp_path / "cache")
    prepare_embedded_dataset(cache)
    prefix = embedded_prefix(cache)
    result = perplexity(str(tmp_path / "hf"), [prefix], samples=8, batch_size=4, cache_dir=cache)

    valid = build_gpt_datasets([prefix], "969,30,1", SEQ, 1234, train_samples=1, valid_samples=8,
                               tokenizer=embedded_tokenizer(), cache_dir=cache).valid
    tokens, labels, mask = collate(valid, list(range(8)))
    with torch.no_grad():
        loss = ((model(tokens, labels=labels) * mask).sum() / mask.sum()).item()
    assert result["tokens"] == 8 * SEQ and abs(result["loss"] - loss) <= 1e-5 * loss


def write_local_choice_task(tasks, name):
    """A three-question multiple-choice lm-eval task `name` whose data is a local JSON file."""
    tasks.mkdir(exist_ok=True)
    docs = [{"question": "The capital of France is", "choices": [" Paris", " a dog"], "label": 0},
            {"question": "Two plus two is", "choices": [" four", " blue"], "label": 0},
            {"question": "def f(x): return", "choices": [" x", " the"], "label": 1}]
    (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {tasks / f'{name}.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")


def offline_env(tmp_path):
    """No downloads, an empty Hugging Face cache of the test's own."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    env.pop("LOCAL_RANK", None)  # set by the in-process megatron fixture; accelerate would read it as a launch
    return env


def test_eval_lm_offline_runs_local_tasks_and_the_paper_suite(megatron_single, tmp_path):
    """One offline tools/eval_lm.py run (one lm-eval start, as a user would run it):
    - `--tasks tiny_choice --include-path`: a local task runs;
    - `--suite paper` with part of its data: the Pile perplexity from --pile-data (the same
      number as evaluation.perplexity on that data), piqa from a local task YAML that takes the
      place of lm-eval's, every other evaluation listed as skipped."""
    pytest.importorskip("lm_eval")
    from mesh_megatron import evaluation
    from mesh_megatron.data.embedded import embedded_prefix, prepare_embedded_dataset

    cfg = tiny("mesh")
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    cache = str(tmp_path / "cache")
    prepare_embedded_dataset(cache)
    pile = embedded_prefix(cache)  # stands in for the Pile validation documents
    write_local_choice_task(tmp_path / "tasks", "piqa")
    write_local_choice_task(tmp_path / "tasks", "tiny_choice")
    out = tmp_path / "results.json"
    proc = run_script(os.path.join(ROOT, "tools/eval_lm.py"),
                      ["--model-dir", str(tmp_path / "hf"), "--suite", "paper", "--offline", "--skip-unavailable",
                       "--pile-data", pile, "--perplexity-samples", "8", "--perplexity-batch-size", "4",
                       "--data-cache-dir", cache, "--include-path", str(tmp_path / "tasks"),
                       "--tasks", "tiny_choice", "--num-fewshot", "0", "--limit", "3",
                       "--batch-size", "2", "--output", str(out)],
                      env=offline_env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    local = results["lm_eval"]["results"]["tiny_choice"]
    assert 0.0 <= local["acc,none"] <= 1.0 and local["sample_len"] == 3

    paper = results["paper"]
    summary, piqa = paper["summary"], paper["lm_eval"]["results"]["piqa"]

    expected = evaluation.perplexity(str(tmp_path / "hf"), [pile], split=evaluation.PILE_SPLIT, which="train",
                                  samples=8, batch_size=4, cache_dir=cache)
    assert summary["pile_perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert piqa["sample_len"] == 3  # the local three questions, not lm-eval's piqa
    assert summary["zero_shot_acc"] == {"piqa": piqa["acc,none"]} and summary["zero_shot_tasks_run"] == 1
    assert summary["zero_shot_avg_acc"] == piqa["acc,none"]
    skipped = {item.split(" ")[0] for item in summary["skipped"]}
    assert skipped == set(evaluation.PAPER_ZERO_SHOT + evaluation.PAPER_PERPLEXITY_TASKS) - {"piqa"}
    assert proc.stdout.count("skipped: ") == len(skipped)
    assert f"pile_perplexity: {expected['perplexity']:.4f}" in proc.stdout


# -----------------------------------------------------------------------------
# bad input: one clear error each


def test_bad_inputs_each_give_one_clear_error(megatron_single, tmp_path):
    cfg = tiny("base")
    state = random_model(cfg).state_dict()
    good = save_like_training(tmp_path / "good", cfg, state, iteration=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = save_like_training(tmp_path / "truncated", cfg, state)
    shard = truncated / "iter_0000003" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    half = {k: v for k, v in state.items()}
    missing_rank = save_like_training(tmp_path / "tp2", cfg, [half, half], tp=2)
    (missing_rank / "iter_0000003" / "mp_rank_01_model_states.pt").unlink()
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    out = tmp_path / "out"

    cases = [
        (lambda: export_to_hf(str(tmp_path / "nope"), str(out)), "does not exist"),
        (lambda: export_to_hf(str(empty), str(out)), "holds no checkpoint \\(no 'latest' file\\)"),
        (lambda: export_to_hf(str(good), str(out), iteration=7),
         "iteration 7 is not in .* \\(complete iterations: 3\\)"),
        (lambda: export_to_hf(str(truncated), str(out)), "mp_rank_00_model_states.pt is truncated or corrupt"),
        (lambda: export_to_hf(str(missing_rank), str(out)), "is missing mp_rank_01_model_states.pt"),
        (lambda: export_to_hf(str(good), str(llama)), "is not empty"),
        (lambda: export_to_hf(str(good), str(good / "hf"), force=True), "overlaps the source"),
        (lambda: import_from_hf(str(llama), str(out)), "is a 'llama' model"),
        (lambda: import_from_hf(str(empty), str(out)), "has no config.json"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
        assert not out.exists()  # nothing written on bad input

    random_pythia(tmp_path / "pythia")
    with pytest.raises(ConfigError, match="needs --layout P\\+CrK\\+Q"):
        import_from_hf(str(tmp_path / "pythia"), str(out), variant="mesh")
    with pytest.raises(ConfigError, match="runs 8 layers but the source has 6"):
        import_from_hf(str(tmp_path / "pythia"), str(out), variant="mesh", layout="2+2R2+2")
    assert not out.exists()


def test_cli_errors_are_one_line(tmp_path):
    proc = run_script(os.path.join(ROOT, "tools/convert_from_hf.py"),
                      ["--hf", str(tmp_path / "nope"), "--save", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: --hf {tmp_path / 'nope'}: no such directory; " \
                                                   "pass a Hugging Face model directory"


# -----------------------------------------------------------------------------
# shards, TP import, HF tokenizer.json


def test_reader_merges_tensor_and_pipeline_shards(megatron_single, tmp_path):
    """TP=2 x PP=2 files (mp = pp * tp + tp_rank, stages hold disjoint global names) merge to the
    full model; the padded vocabulary of a TP=2 run (multiple of 256) is kept and exported."""
    from mesh_megatron.checkpoint.skeleton import meta_model, with_padded_vocab_of
    from mesh_megatron.checkpoint.tensor_parallel import shard_state_dict

    cfg = tiny("mesh", vocab_size=4100)  # TP=1 pads to 4224, TP=2 to 4352
    full_cfg = with_padded_vocab_of(cfg, 2)
    model = random_model(full_cfg)
    full = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert full["embedding.word_embeddings.weight"].shape[0] == 4352
    skeleton = meta_model(full_cfg)
    first_stage = {k for k in full if k.startswith(("embedding.", "block.prelude.", "block.core.", "block.state"))}
    files = []
    for pp_rank in range(2):
        for tp_rank in range(2):
            shard = shard_state_dict(full, skeleton, tp_rank, 2)
            files.append((pp_rank * 2 + tp_rank,
                          {k: v for k, v in shard.items() if (k in first_stage) == (pp_rank == 0)}))
    files = [f for _, f in sorted(files, key=lambda x: x[0])]
    save_like_training(tmp_path / "ckpt", cfg, files, tp=2)
    meta_path = tmp_path / "ckpt" / "iter_0000003" / "mesh_config.json"
    meta = json.loads(meta_path.read_text())
    meta["parallel"]["pipeline_model_parallel_size"] = 2
    meta_path.write_text(json.dumps(meta))

    merged = read_model_state(open_checkpoint(str(tmp_path / "ckpt")))
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 4352
    ids = token_ids(vocab=4100)
    with torch.no_grad():
        assert rel_err(load_hf(tmp_path / "hf")(ids).logits, model(ids)) <= 1e-5


def test_import_at_tensor_parallel_2_writes_shards_that_merge_back(megatron_single, tmp_path):
    random_pythia(tmp_path / "pythia")
    import_from_hf(str(tmp_path / "pythia"), str(tmp_path / "tp1"))
    report = import_from_hf(str(tmp_path / "pythia"), str(tmp_path / "tp2"), tensor_parallel_size=2)
    assert report.model.padded_vocab_size(2) == 512  # no padding added: 512 rows split 2 x 256
    tag = tmp_path / "tp2" / "iter_0000000"
    assert (tag / "mp_rank_00_model_states.pt").exists() and (tag / "mp_rank_01_model_states.pt").exists()
    half = torch.load(tag / "mp_rank_01_model_states.pt", weights_only=False)["module"]
    assert half["block.prelude.0.self_attention.linear_qkv.weight"].shape == (96, 64)
    assert "block.prelude.0.self_attention.linear_qkv._extra_state" in half  # DeepSpeed's strict load
    a = read_model_state(open_checkpoint(str(tmp_path / "tp1")))
    b = read_model_state(open_checkpoint(str(tmp_path / "tp2")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_with_a_tokenizer_json(megatron_single, tmp_path):
    """A run trained with --tokenizer-type hf: its tokenizer.json is exported for AutoTokenizer."""
    from transformers import AutoTokenizer

    from mesh_megatron.conversion.tokenizer import _fast_from_sentencepiece

    cfg = tiny("base")
    ckpt = save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict(), tokenizer=False)
    fast, _ = _fast_from_sentencepiece(str(EMBEDDED_TOKENIZER_MODEL))
    (ckpt / "iter_0000003" / "tokenizer").mkdir()
    fast.save(str(ckpt / "iter_0000003" / "tokenizer" / "tokenizer.json"))
    meta_path = ckpt / "iter_0000003" / "mesh_config.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"] = {"type": "hf", "file": "tokenizer/tokenizer.json"}
    meta_path.write_text(json.dumps(meta))

    export_to_hf(str(ckpt), str(tmp_path / "hf"), progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "</s>" and tok.eos_token_id == 2
    assert tok("Hello world")["input_ids"] == fast.encode("Hello world", add_special_tokens=False).ids
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 2


# -----------------------------------------------------------------------------
# relaxed sharing: adapters exported explicitly (names mirror the training keys)


RELAXED = dict(lora_rank=4, lora_alpha=8.0, relax_biases=True, relax_norms=True)


def relaxed_model(cfg, seed=0):
    model = random_model(cfg, seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith((".lora_B", "_delta")):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("variant", ["base", "mesh", "mor"])
def test_relaxed_export_parity_tp2_merge_and_round_trip(megatron_single, tmp_path, variant):
    """HF logits == training logits for a model with random per-iteration adapters, from TP=1 and
    from TP=2 shards (B of column-parallel and A of row-parallel split); export -> import ->
    export is identical. mor: recursion r's adapters run on its kept tokens (top-k routing)."""
    from mesh_megatron.checkpoint.skeleton import meta_model
    from mesh_megatron.checkpoint.tensor_parallel import shard_state_dict

    cfg = tiny(variant, **RELAXED)
    model = relaxed_model(cfg)
    full = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    skeleton = meta_model(cfg)
    shards = [shard_state_dict(full, skeleton, r, 2) for r in range(2)]
    assert shards[1]["block.core.0.self_attention.linear_qkv.lora_B"].shape == (2, 96, 4)  # [K, out/2, r]
    assert shards[1]["block.core.0.mlp.linear_fc2.lora_A"].shape == (2, 4, 128)  # [K, r, in/2]
    assert shards[1]["block.core.0.mlp.linear_fc2.lora_B"].shape == (2, 64, 4)  # replicated
    save_like_training(tmp_path / "ckpt", cfg, full)
    save_like_training(tmp_path / "ckpt_tp2", cfg, shards, tp=2)
    ids = token_ids()
    with torch.no_grad():
        want = model(ids)
    for ckpt, out in (("ckpt", "hf1"), ("ckpt_tp2", "hf_tp2")):
        export_to_hf(str(tmp_path / ckpt), str(tmp_path / out), progress=False)
        hf = load_hf(tmp_path / out)
        with torch.no_grad():
            assert rel_err(hf(ids).logits, want) <= 1e-5, ckpt
    saved = load_file(str(tmp_path / "hf1" / "model.safetensors"))
    assert saved["gpt_neox.layers.1.attention.query_key_value.lora_A"].shape == (2, 4, 64)
    assert saved["gpt_neox.layers.2.post_attention_layernorm.weight_delta"].shape == (2, 64)
    assert not any("lora" in k or "delta" in k for k in saved if k.startswith(("gpt_neox.layers.0.",
                                                                               "gpt_neox.layers.3.")))
    config = json.loads((tmp_path / "hf1" / "config.json").read_text())
    assert (config["lora_rank"], config["lora_alpha"], config["relax_norms"]) == (4, 8.0, True)
    # the adapters are what makes the logits: the HF model with them zeroed is far away
    hf = load_hf(tmp_path / "hf1")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("lora_B", "_delta")):
                p.zero_()
        assert rel_err(hf(ids).logits, want) > 1e-2
    import_from_hf(str(tmp_path / "hf1"), str(tmp_path / "ckpt2"))
    back = open_checkpoint(str(tmp_path / "ckpt2")).model
    assert [getattr(back, k) for k in (*RELAXED, "lora_targets")] == [getattr(cfg, k) for k in (*RELAXED, "lora_targets")]
    export_to_hf(str(tmp_path / "ckpt2"), str(tmp_path / "hf2"), progress=False)
    again = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert config == json.loads((tmp_path / "hf2" / "config.json").read_text())


def test_svd_import_full_rank_reproduces_pythia_and_kept_fraction_matches(megatron_single, tmp_path):
    """6-layer random GPTNeoXForCausalLM as base 1+2R2+1: at full rank (biases and norms relaxed)
    the relaxed recursion is the source model; at rank 2 the reported kept fraction is a direct
    SVD's and the adapters are its truncation (scaled by 1 / (alpha / r))."""
    pythia = random_pythia(tmp_path / "pythia")
    source = load_file(str(tmp_path / "pythia" / "model.safetensors"))
    ids = token_ids(vocab=512)
    with torch.no_grad():
        want = pythia(ids).logits
    for init in ("stepwise", "average"):
        ckpt = tmp_path / f"full_{init}"
        report = import_from_hf(str(tmp_path / "pythia"), str(ckpt), layout="1+2R2+1", variant="base",
                                init=init, lora_rank="full")
        assert (report.model.lora_rank, report.model.relax_biases, report.model.relax_norms) == (64, True, True)
        model = build_model(report.model, read_model_state(open_checkpoint(str(ckpt))))
        with torch.no_grad():
            assert (model(ids) - want).abs().max() <= 1e-4, init
        assert all(abs(f - 1.0) <= 1e-6 for f in report.kept_fraction.values())
    # without the adapters the tied model is far from the source: the test can fail
    tied = import_from_hf(str(tmp_path / "pythia"), str(tmp_path / "tied"), layout="1+2R2+1", variant="base")
    with torch.no_grad():
        plain = build_model(tied.model, read_model_state(open_checkpoint(str(tmp_path / "tied"))))(ids)
    assert (plain - want).abs().max() > 1e-2

    report = import_from_hf(str(tmp_path / "pythia"), str(tmp_path / "r2"), layout="1+2R2+1", variant="base",
                            init="stepwise", lora_rank=2, lora_alpha=4.0, lora_targets="dense_h_to_4h")
    # stepwise: core 1 <- layer 3; iteration 1 of core 1 is layer 4 (P + t*C + j = 1 + 2 + 1)
    name = "mlp.dense_h_to_4h.weight"
    residual = source[f"gpt_neox.layers.4.{name}"].double() - source[f"gpt_neox.layers.3.{name}"].double()
    sv = torch.linalg.svdvals(residual)
    assert report.kept_fraction[f"gpt_neox.layers.4.{name}"] == pytest.approx(
        (sv[:2].square().sum() / sv.square().sum()).sqrt().item(), rel=1e-9)
    # stepwise's picks are not positions of their own core under the loop (core 1 <- layer 3 runs at
    # layers 2 and 4), so no residual is zero
    assert 0 < report.kept_fraction["gpt_neox.layers.2.mlp.dense_h_to_4h.weight"] < 1
    assert len(report.kept_fraction) == 4  # one target x 2 core layers x 2 iterations
    state = read_model_state(open_checkpoint(str(tmp_path / "r2")))
    A, B = (state[f"block.core.1.mlp.linear_fc1.lora_{x}"][1].double() for x in "AB")
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    torch.testing.assert_close(2.0 * B @ A, (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-5)


def test_depth_sweep_writes_its_table_and_plot(megatron_single, tmp_path, capsys):
    """tools/eval_lm.py --num-loops 1,2,4 on a tiny base export: one perplexity per depth (the
    trained K's equals the plain perplexity), the table printed, the plot and JSON written."""
    import sys

    from mesh_megatron.data.embedded import embedded_prefix, prepare_embedded_dataset

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import eval_lm

    cfg = tiny("base")
    save_like_training(tmp_path / "ckpt", cfg, random_model(cfg).state_dict())
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    cache = str(tmp_path / "cache")
    prepare_embedded_dataset(cache)
    common = ["--model-dir", str(tmp_path / "hf"), "--perplexity-data", embedded_prefix(cache),
              "--perplexity-samples", "4", "--perplexity-batch-size", "4", "--data-cache-dir", cache]
    out = tmp_path / "sweep.json"
    assert eval_lm.main(common + ["--num-loops", "1,2,4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| num_loops | loss | perplexity |" in printed and "depth sweep (trained K = 2)" in printed
    result = json.loads(out.read_text())["perplexity"]
    assert [d["num_loops"] for d in result["depths"]] == [1, 2, 4]
    assert result["depths"][1]["loss"] == result["loss"]
    assert len({d["loss"] for d in result["depths"]}) == 3
    assert (tmp_path / "sweep_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert eval_lm.main(common + ["--num-loops", "1,x"]) == 2
    assert "pass comma-separated integers" in capsys.readouterr().err
    assert eval_lm.main(common + ["--num-loops", "1,2"]) == 2
    assert "writes a plot: pass --plot" in capsys.readouterr().err
