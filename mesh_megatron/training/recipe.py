"""Recipes: one YAML file that holds a whole run (model, training, parallel, data...).

    model:      preset, variant, layout, mesh_slots, mesh_router_init, mesh_router_margin,
                seq_length, hidden_dropout, attention_dropout + any ModelConfig field
    training:   lr, min_lr, lr_warmup_fraction, weight_decay, adam_*, clip_grad, batch sizes,
                train_iters, precision (fp32|bf16|fp16), seed, nan_policy
    parallel:   tensor/pipeline sizes, pipeline_split, ds_config
    checkpoints: save, save_interval, keep_last, eval_interval, eval_iters, log_interval, ...
    data:       data_path, split, tokenizer_type, tokenizer_model, data_cache_dir
    logging:    tensorboard_dir, wandb_project, log_jsonl, wandb_mode

A section's keys are the flags of the argparse group of the same name (`--min-lr` ->
`min_lr`), so a flag added to a group is a recipe key with no change here. Precedence,
lowest first: argparse defaults < the recipe recorded in `--load`'s checkpoint < the
`--config` file < flags given on the command line. A file holding only ModelConfig fields
(no sections; e.g. the model.yaml of an imported checkpoint) is read as the model section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Optional

from mesh_megatron.config import ConfigError, ModelConfig, preset

# argparse group title -> recipe section
SECTIONS = {"model": "model", "parallelism": "parallel", "training": "training",
            "checkpoints and evaluation": "checkpoints", "data": "data", "logging": "logging"}
# Flags that steer this one invocation, not the run: never read from or written to a recipe.
NOT_RECIPE = {"help", "config", "load", "print_config", "local_rank", "deepspeed", "exit_interval",
              "exit_duration_in_mins", "overwrite_save", "distributed_timeout_minutes",
              "preempt_grace_seconds"}
# Model flags that are also ModelConfig fields (mesh_slots, dropout, ...) go through the flags.
FIELD_FLAGS = ("mesh_slots", "mesh_router_init", "mesh_router_margin", "mesh_routers", "mesh_step_embedding",
               "input_injection", "state_init", "seq_length", "hidden_dropout", "attention_dropout",
               "lora_rank", "lora_alpha", "lora_targets", "relax_biases", "relax_norms",
               "mor_routing", "mor_capacities", "mor_alpha", "mor_aux_weight", "mor_z_loss", "mor_kv",
               "mor_balance_weight", "mor_bias_rate")
MODEL_FLAGS = ("preset", "variant", "layout", *FIELD_FLAGS)
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclasses.dataclass
class _Key:
    section: str
    action: Optional[argparse.Action]  # None: a ModelConfig field without a flag


def _keys(parser: argparse.ArgumentParser) -> dict[tuple[str, str], _Key]:
    keys: dict[tuple[str, str], _Key] = {}
    for group in parser._action_groups:
        section = SECTIONS.get(group.title or "")
        if section is None:
            continue
        for action in group._group_actions:
            if action.dest not in NOT_RECIPE and action.dest not in ("bf16", "fp16"):
                keys[(section, action.dest)] = _Key(section, action)
    keys[("training", "precision")] = _Key("training", None)
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name in model_fields - set(MODEL_FLAGS):
        keys[("model", name)] = _Key("model", None)
    return keys


# ------------------------------------------------------------------ reading a file
def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every key, two levels deep: {(section,): l, (section, key): l}."""
    import yaml

    lines: dict[tuple[str, ...], int] = {}
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return lines
    for k, v in node.value:
        lines[(k.value,)] = k.start_mark.line + 1
        if isinstance(v, yaml.MappingNode):
            for k2, _ in v.value:
                lines[(k.value, k2.value)] = k2.start_mark.line + 1
    return lines


def read_recipe(path: str) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, ...], int]]:
    """{section: {key: value}} of a recipe file, and the line of each key (for messages)."""
    import yaml

    from mesh_megatron.paths import check_input_file

    check_input_file(path, "--config", "pass a YAML recipe (examples/configs/*.yaml)")
    text = open(path).read()
    try:
        data = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: malformed YAML ({getattr(e, 'problem', None) or e}): fix the syntax "
                          "(a recipe is 'section:' lines with indented 'key: value' lines)") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS.values())}), "
                          f"got a {type(data).__name__}")
    sections = set(SECTIONS.values())
    if not set(data) & sections:  # a bare model config (legacy / model.yaml of an import)
        return {"model": data}, {("model", k[0]): line for k, line in lines.items() if len(k) == 1}
    for key in data:
        if key not in sections:
            raise ConfigError(f"{path}:{lines.get((key,), '?')}: unknown section {key!r}: sections are "
                              f"{', '.join(sorted(sections))} (fix the name or move its keys into one)")
        if not isinstance(data[key] or {}, dict):
            raise ConfigError(f"{path}:{lines.get((key,), '?')}: section {key!r} must hold 'key: value' lines")
    return {k: dict(v or {}) for k, v in data.items()}, lines


def _model_field(value: Any, name: str, where: str) -> Any:
    """A ModelConfig field from YAML, typed as its dataclass annotation says (what a flag's
    `type=` does): "64" -> 64, 6e-4 -> 0.0006, 12 -> "12" for a layout; a wrong type is one line."""
    import typing

    hint = typing.get_type_hints(ModelConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    kind = args[0] if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name}: needs a value (null is not allowed)")
    try:
        if name == "learned_scalar_init":
            out = tuple(float(x) for x in value)
            if len(out) != 3:
                raise ValueError
            return out
        if name == "lora_rank" and value == "full":
            return value
        if name == "mor_capacities" and isinstance(value, list):  # [1.0, 0.5] -> "1,0.5"
            return ",".join(repr(float(c)) for c in value)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and value != int(value)):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        what = "three numbers (a1, a2, a3)" if name == "learned_scalar_init" else \
            "true or false" if kind is bool else f"a valid {getattr(kind, '__name__', kind)}"
        raise ConfigError(f"{where}: {name}: {value!r} is not {what}") from None


def normalized(model: ModelConfig) -> ModelConfig:
    """What the flag path does to a model, for a model given field by field: `vanilla` with a
    looped layout runs it unrolled (P + C*K + Q distinct layers), as preset() does for
    `--variant vanilla --layout P+CrK+Q`."""
    from mesh_megatron.config import Layout

    layout = Layout.parse(model.layout)
    if model.variant == "vanilla" and layout.is_looped:
        return dataclasses.replace(model, layout=str(layout.compute_depth))
    return model


def _coerce(value: Any, key: _Key, name: str, where: str) -> Any:
    """A YAML value -> what argparse would have produced from the flag (checked)."""
    action = key.action
    if action is None:
        if name == "precision":
            if value not in PRECISIONS:
                raise ConfigError(f"{where}: precision {value!r}: use one of {', '.join(PRECISIONS)}")
            return value
        return _model_field(value, name, where)
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} takes true or false, not {value!r}")
        return value
    convert = action.type or str
    try:
        if action.nargs in ("*", "+"):
            items = value.split() if isinstance(value, str) else list(value)
            out = [convert(str(v)) if convert is str else convert(v) for v in items]
        else:
            # YAML reads 6e-4 (no dot) as a string: float() takes it.
            out = convert(str(value)) if convert is str else convert(value)
            if convert is int and isinstance(value, float) and value != int(value):
                raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name}: {value!r} is not a valid {getattr(convert, '__name__', convert)}"
                          ) from None
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{where}: {name}: {out!r} is not one of {', '.join(map(str, action.choices))}")
    return out


def flatten(recipe: dict[str, dict[str, Any]], parser: argparse.ArgumentParser, source: str,
            lines: Optional[dict] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(argparse defaults, extra ModelConfig fields) from a sectioned recipe; unknown keys refused."""
    keys = _keys(parser)
    flags: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for section, entries in recipe.items():
        for name, value in entries.items():
            where = f"{source}:{(lines or {}).get((section, name), '?')}"
            key = keys.get((section, name))
            if key is None:
                home = sorted(s for s, n in keys if n == name)
                fix = (f"it belongs in section {home[0]!r}" if home else
                       "known keys: " + ", ".join(sorted(n for s, n in keys if s == section)))
                raise ConfigError(f"{where}: unknown key {name!r} in section {section!r}: {fix}")
            value = _coerce(value, key, name, where)
            if name == "precision":
                flags.update(bf16=value == "bf16", fp16=value == "fp16")
            elif key.action is None:
                fields[name] = value
            else:
                flags[key.action.dest] = value
    return flags, fields


# ------------------------------------------------------------------ resolution
def _explicit(build_parser: Callable[[], argparse.ArgumentParser], argv) -> dict[str, Any]:
    """The flags actually typed (argparse defaults suppressed)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def recorded_recipe(load_dir: str) -> Optional[dict[str, dict[str, Any]]]:
    """The recipe a checkpoint directory's latest checkpoint was trained with, if it recorded one."""
    from mesh_megatron.checkpoint.manager import CONFIG_FILE, LATEST

    try:
        tag = open(os.path.join(load_dir, LATEST)).read().strip()
        with open(os.path.join(load_dir, tag, CONFIG_FILE)) as f:
            return json.load(f).get("recipe")
    except (OSError, ValueError):
        return None  # no checkpoint / none recorded: --load's own checks say what is wrong


def resolve_args(build_parser: Callable[[], argparse.ArgumentParser], argv=None) -> argparse.Namespace:
    """Parse argv over the recorded and file recipes. The namespace gains `model_fields`
    (ModelConfig fields without a flag, e.g. hidden_size), `model_full` (True when the
    model section is a complete ModelConfig rather than a preset plus overrides) and
    `from_recorded` (the flag dests whose value came from --load's recorded recipe)."""
    parser = build_parser()
    explicit = _explicit(build_parser, argv)
    flags: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    if explicit.get("load"):
        recorded = recorded_recipe(explicit["load"])
        if recorded:
            flags, fields = flatten(recorded, parser, f"{explicit['load']} (recorded recipe)")
    if explicit.get("config"):
        recipe, lines = read_recipe(explicit["config"])
        file_flags, file_fields = flatten(recipe, parser, explicit["config"], lines)
        if "preset" in recipe.get("model", {}) or set(file_fields) & {"hidden_size", "layout"}:
            fields = {}  # the file names its own model: nothing of the recorded one carries over
        flags.update(file_flags)
        fields.update(file_fields)
    recorded_flags = set(flags)
    if explicit.get("config"):
        recorded_flags -= set(file_flags)
    parser.set_defaults(**flags)
    args = parser.parse_args(argv)
    args.from_recorded = recorded_flags - set(explicit)  # dests --load's recipe decided
    args.model_fields = fields
    args.model_full = "preset" not in flags and "preset" not in explicit and "hidden_size" in fields
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig of resolved args: a preset plus overrides, or a complete field set."""
    fields = dict(getattr(args, "model_fields", {}))
    flags = {k: getattr(args, k) for k in FIELD_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "model_full", False):
        fields.update(variant=args.variant, **({"layout": args.layout} if args.layout else {}), **flags)
        try:
            return normalized(ModelConfig(**fields))
        except TypeError as e:
            raise ConfigError(f"model section: {e}") from None
    return preset(args.preset, args.variant, args.layout, **fields, **flags)


def resolved(parser: argparse.ArgumentParser, args: argparse.Namespace, model: ModelConfig,
             micro: int, global_: int, precision: str) -> dict[str, dict[str, Any]]:
    """The recipe of this run, every key explicit: `--config` of it reproduces the run."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS.values()}
    for (section, name), key in _keys(parser).items():
        if key.action is not None:
            out[section][name] = getattr(args, key.action.dest)
    out["training"].update(micro_batch_size=micro, global_batch_size=global_, precision=precision)
    if getattr(args, "model_full", False):  # every ModelConfig field, no preset
        out["model"] = json.loads(json.dumps(dataclasses.asdict(model)))
    else:
        out["model"].update(layout=model.layout, seq_length=model.seq_length,
                            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in args.model_fields.items()})
    return out


def to_yaml(recipe: dict[str, dict[str, Any]]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)


def print_config(parser: argparse.ArgumentParser, args: argparse.Namespace, model: ModelConfig,
                 parallel, world: int) -> int:
    """--print-config: the cheap checks (model, parallel sizes, batch arithmetic), then the
    resolved recipe as YAML on stdout. Data and tokenizer files are not opened."""
    from mesh_megatron.config import TrainingConfig, validate, validate_training
    from mesh_megatron.parallel.deepspeed_config import (describe_gradient_precision, finalize_ds_config,
                                                         gradient_precision_warning, load_ds_config, resolve_batch,
                                                         zero_stage)

    validate(model, parallel, world)
    dp = world // (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size)
    ds = load_ds_config(args.ds_config)
    micro, global_ = resolve_batch(ds, args.micro_batch_size, args.global_batch_size, dp, args.ds_config)
    precision = run_precision(args, ds)
    train = TrainingConfig(micro_batch_size=micro, global_batch_size=global_, train_iters=args.train_iters,
                           precision=precision)
    validate_training(train, dp)
    final = finalize_ds_config(ds, train, dp, args.ds_config, parallel.pipeline_model_parallel_size)
    print(to_yaml(resolved(parser, args, model, micro, global_, precision)), end="")
    # A YAML comment: feeding the output back as --config still gives the same run.
    print(f"# {args.ds_config}: ZeRO stage {zero_stage(final)}, {describe_gradient_precision(final, precision)}")
    warning = gradient_precision_warning(final, precision, args.ds_config)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def run_precision(args: argparse.Namespace, ds: dict) -> str:
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive: pick one")
    return "bf16" if args.bf16 or ds.get("bf16", {}).get("enabled") else \
        "fp16" if args.fp16 or ds.get("fp16", {}).get("enabled") else "fp32"
