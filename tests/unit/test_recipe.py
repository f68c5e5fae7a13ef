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


@pytest.fixture(autouse=True)
def _at_the_repository_root(monkeypatch):
    """The shipped recipes name their ds_config relative to the repository root, where users run
    them (and `make test` runs pytest): run these tests there wherever pytest was started."""
    monkeypatch.chdir(ROOT)


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


def test_mesh_router_init_is_a_recipe_key_and_a_flag(tmp_path, capsys):
    """--mesh-router-init / --mesh-router-margin: in the resolved recipe, fed back unchanged,
    the same ModelConfig from a recipe file as from the flags; bad values are one line."""
    flags = ["--mesh-router-init", "base", "--mesh-router-margin", "6"]
    out = print_config(flags, capsys)
    assert (out["model"]["mesh_router_init"], out["model"]["mesh_router_margin"]) == ("base", 6.0)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(out))
    assert print_config(["--config", str(again)], capsys) == out
    by_flags = arguments.parse(flags + ["--save", str(tmp_path / "a")], world_size=1).model
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  mesh_router_init: base\n  mesh_router_margin: 6.0\n")
    by_file = arguments.parse(["--config", str(recipe), "--save", str(tmp_path / "a")], world_size=1).model
    assert by_flags == by_file and by_flags.router_margin == 6.0
    assert arguments.parse(["--save", str(tmp_path / "a")], world_size=1).model.mesh_router_init == "paper"
    with pytest.raises(ConfigError, match="has no MeSH routers"):
        arguments.parse(["--variant", "base", "--mesh-router-init", "base", "--save", str(tmp_path / "a")],
                        world_size=1)


def test_print_config_fed_back_resolves_the_same_run(tmp_path, capsys):
    """--print-config's YAML, given back as --config, resolves to the same run: every field of
    the RunConfig (model, parallel, training, data, logging and execution dataclasses, the
    ds_config, the recipe), not only the same text."""
    argv = ["--variant", "anchor_emb", "--layout", "2+1R3+1", "--seq-length", "64", "--hidden-dropout", "0.1",
            "--attention-dropout", "0.05", "--lr", "7e-4", "--min-lr", "7e-5", "--lr-warmup-fraction", "0.1",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "12", "--clip-grad", "0.5",
            "--adam-eps", "1e-6", "--seed", "7", "--bf16", "--recompute", "loop", "--attention-backend", "local",
            "--nan-policy", "skip", "--ds_config", "examples/zero1.json", "--save", str(tmp_path / "ck"),
            "--save-interval", "4", "--keep-last", "3", "--eval-interval", "3", "--eval-iters", "2",
            "--log-interval", "2", "--sample-tokens", "5", "--log-jsonl", str(tmp_path / "log.jsonl")]
    direct = arguments.parse(argv, world_size=1)
    path = tmp_path / "printed.yaml"
    path.write_text(yaml.safe_dump(print_config(argv, capsys)))
    again = arguments.parse(["--config", str(path)], world_size=1)
    assert direct.model.hidden_dropout == 0.1 and direct.execution.recompute == "loop"  # the flags took
    for field in dataclasses.fields(direct):
        assert getattr(again, field.name) == getattr(direct, field.name), field.name


def test_model_section_is_validated_and_normalised_as_the_flags_are(tmp_path):
    """Whichever way a model arrives (flags, a preset recipe, a field-by-field recipe, a bare
    model.yaml plus flags), the same values give the same ModelConfig, and the same wrong
    values are refused. One case per field the flag path rewrites (layout: vanilla unrolls a
    looped one; vocab_size: fitted to the tokenizer) or checks (variant, preset, layout syntax,
    mesh_slots and seq_length types, and every typed field that has no flag)."""
    save = ["--save", str(tmp_path / "ck"), "--ds_config", os.path.join(ROOT, "examples/zero2.json")]
    tiny_fields = {k: v for k, v in dataclasses.asdict(preset("tiny", "mesh")).items() if k != "vocab_size"}
    tiny_fields["learned_scalar_init"] = list(tiny_fields["learned_scalar_init"])

    def model(argv=(), recipe=None):
        extra = []
        if recipe is not None:
            path = tmp_path / f"r{len(list(tmp_path.iterdir()))}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            extra = ["--config", str(path)]
        return arguments.parse(extra + list(argv) + save, world_size=1).model

    flags = model(["--variant", "vanilla", "--layout", "2+2R2+2"])
    assert flags.layout == "8" and flags.variant == "vanilla"  # unrolled: P + C*K + Q layers
    assert model(recipe={"model": {"preset": "tiny", "variant": "vanilla", "layout": "2+2R2+2"}}) == flags
    assert model(recipe={"model": {**tiny_fields, "variant": "vanilla", "layout": "2+2R2+2"}}) == flags
    assert model(["--variant", "vanilla", "--layout", "2+2R2+2"], recipe=dict(tiny_fields, variant="anchor")) == flags
    # Values typed as the flags' argparse types make them: "6" -> 6, 12 -> "12".
    assert model(["--mesh-slots", "6", "--seq-length", "64"]) == \
        model(recipe={"model": {**tiny_fields, "mesh_slots": "6", "seq_length": "64"}})
    assert model(["--variant", "vanilla", "--layout", "6"]) == \
        model(recipe={"model": {**tiny_fields, "variant": "vanilla", "layout": 6}})
    typed = model(recipe={"model": {**tiny_fields, "hidden_size": "64", "rotary_base": 10000.0,
                                    "layernorm_epsilon": "1e-5", "learned_scalar_init": [1, 1, 0]}})
    assert typed == model() and isinstance(typed.hidden_size, int) and isinstance(typed.layernorm_epsilon, float)
    # vocab_size: the tokenizer's (4096 embedded) unless the model fixes it, both ways.
    assert model().vocab_size == model(recipe={"model": tiny_fields}).vocab_size == 4096

    refused = [  # (model section, message); the flag's argparse error for the same value in the comment
        ({**tiny_fields, "variant": "vanila"}, "variant: 'vanila' is not one of"),       # --variant vanila
        ({"preset": "tiny-x"}, "preset: 'tiny-x' is not one of"),                         # --preset tiny-x
        ({**tiny_fields, "mesh_slots": "six"}, "mesh_slots: 'six' is not a valid int"),   # --mesh-slots six
        ({**tiny_fields, "seq_length": 6.5}, "seq_length: 6.5 is not a valid int"),      # --seq-length 6.5
        ({**tiny_fields, "layout": "2+2x2+2"}, "layout '2\\+2x2\\+2' is malformed"),      # --layout 2+2x2+2
        ({**tiny_fields, "hidden_size": "wide"}, "hidden_size: 'wide' is not a valid int"),
        ({**tiny_fields, "scale_embeddings": "yes"}, "scale_embeddings: 'yes' is not true or false"),
        ({**tiny_fields, "learned_scalar_init": [1, 1]}, "learned_scalar_init: \\[1, 1\\] is not three numbers"),
        ({**tiny_fields, "hidden_size": None}, "hidden_size: needs a value"),
    ]
    for section, message in refused:
        with pytest.raises(ConfigError, match=message) as e:
            model(recipe={"model": section})
        assert "\n" not in str(e.value), section
    for argv in (["--variant", "vanila"], ["--preset", "tiny-x"], ["--mesh-slots", "six"], ["--seq-length", "6.5"]):
        with pytest.raises(SystemExit):
            model(argv)
    with pytest.raises(ConfigError, match="layout '2\\+2x2\\+2' is malformed"):
        model(["--layout", "2+2x2+2"])
