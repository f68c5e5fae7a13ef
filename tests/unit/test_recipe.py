"""Recipes (--config FILE.yaml): every shipped file validates and round-trips through
--print-config, flags override the file, bad files get one line with file:line, and
--load alone continues the recipe recorded in the checkpoint."""

import dataclasses
import glob
import json
import os

import pytest
import yaml

from mesh_megatron.config import ConfigError, preset
from mesh_megatron.training import arguments

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))


def print_config(argv, capsys) -> dict:
    with pytest.raises(SystemExit) as stop:
        arguments.parse(argv + ["--print-config"], world_size=1)
    assert stop.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_shipped_recipe_validates_and_round_trips(tmp_path, capsys):
    assert len(CONFIGS) == 16
    for path in CONFIGS:
        name = os.path.basename(path)[:-5]
        preset_name, variant = name.rsplit("-", 1)
        first = print_config(["--config", path], capsys)
        assert first["model"]["preset"] == preset_name and first["model"]["variant"] == variant
        # The paper's recipe (docs/MESH_METHOD.md section 4), resolved.
        t = first["training"]
        assert (t["global_batch_size"], first["model"]["seq_length"]) == (512, 4096)
        assert (t["adam_beta1"], t["adam_beta2"], t["weight_decay"], t["precision"]) == (0.9, 0.95, 0.01, "bf16")
        assert t["min_lr"] == pytest.approx(t["lr"] / 10) and t["lr_warmup_fraction"] == 0.01
        assert t["lr"] == {"pythia-160m": 6e-4, "pythia-410m": 3e-4, "pythia-1b": 2.5e-4, "pythia-1.4b": 2e-4}[preset_name]
        again = tmp_path / f"{name}.yaml"
        again.write_text(yaml.safe_dump(first))
        assert print_config(["--config", str(again)], capsys) == first, name


def test_flags_override_the_file_and_the_file_overrides_defaults(capsys):
    path = os.path.join(ROOT, "examples", "configs", "pythia-160m-base.yaml")
    out = print_config(["--config", path, "--lr", "1e-4", "--variant", "mesh", "--global-batch-size", "256"], capsys)
    assert out["training"]["lr"] == 1e-4 and out["model"]["variant"] == "mesh"
    assert out["training"]["global_batch_size"] == 256
    assert out["training"]["min_lr"] == 6e-5  # from the file, not the argparse default 3e-4
    assert out["parallel"]["ds_config"] == "examples/zero1.json"


def test_bare_model_file_and_overrides(tmp_path, capsys):
    """A file of ModelConfig fields alone is the model section (model.yaml of an import)."""
    cfg = dataclasses.replace(preset("tiny", "anchor"), hidden_size=96, num_attention_heads=4)
    full = {**dataclasses.asdict(cfg), "learned_scalar_init": list(cfg.learned_scalar_init)}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(full))
    out = print_config(["--config", str(path), "--layout", "2+2R2+2"], capsys)
    assert out["model"]["hidden_size"] == 96 and out["model"]["variant"] == "anchor"
    assert out["model"]["layout"] == "2+2R2+2"


@pytest.mark.parametrize("text,message", [
    ("training:\n  lr: 1e-3\n  lrr: 2\n", r"bad.yaml:3: unknown key 'lrr' in section 'training': known keys: .*min_lr"),
    ("training:\n  lr: 1e-3\n  preset: tiny\n", r"bad.yaml:3: unknown key 'preset' in section 'training': it belongs in section 'model'"),
    ("model:\n  preset: tiny\nmodle:\n  variant: base\n", r"bad.yaml:3: unknown section 'modle'"),
    ("model:\n  preset: tiny\n  variant: [base\n", r"bad.yaml:\d+: malformed YAML"),
    ("training:\n  train_iters: many\n", r"bad.yaml:2: train_iters: 'many' is not a valid int"),
    ("training:\n  precision: fp8\n", r"bad.yaml:2: precision 'fp8': use one of fp32, bf16, fp16"),
    ("model:\n  variant: anchorr\n", r"bad.yaml:2: variant: 'anchorr' is not one of"),
])
def test_bad_recipe_is_one_line_with_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        arguments.parse(["--config", str(path), "--save", str(tmp_path / "out")], world_size=1)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_load_alone_continues_the_recorded_recipe(tmp_path, capsys):
    """A checkpoint's mesh_config.json "recipe" is the base of `--load DIR`; flags still win."""
    from mesh_megatron.checkpoint.manager import CONFIG_FILE, LATEST

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model:\n  preset: tiny\n  variant: anchor\n  hidden_size: 96\n"
                           "training:\n  lr: 7.0e-4\n  train_iters: 9\n  micro_batch_size: 2\n  global_batch_size: 4\n"
                           f"checkpoints:\n  save: {tmp_path / 'ck'}\n")
    run = arguments.parse(["--config", str(recipe_file)], world_size=1)
    assert run.recipe["training"]["lr"] == 7e-4 and run.recipe["model"]["hidden_size"] == 96
    tag = tmp_path / "ck" / "iter_0000004"
    tag.mkdir(parents=True)
    (tag / CONFIG_FILE).write_text(json.dumps({"model": dataclasses.asdict(run.model), "recipe": run.recipe}))
    (tmp_path / "ck" / LATEST).write_text("iter_0000004")

    resumed = arguments.parse(["--load", str(tmp_path / "ck")], world_size=1)
    assert resumed.model == run.model and resumed.train.lr == 7e-4 and resumed.train.train_iters == 9
    assert resumed.train.save == str(tmp_path / "ck") and resumed.recipe == run.recipe
    longer = arguments.parse(["--load", str(tmp_path / "ck"), "--train-iters", "20"], world_size=1)
    assert longer.train.train_iters == 20 and longer.train.lr == 7e-4
