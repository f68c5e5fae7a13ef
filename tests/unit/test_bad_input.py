"""Bad input to pretrain_mesh.py: one clear line each, before any expensive work, nothing written."""

import json
import os

import numpy as np
import pytest

from launch import run_script
from mesh_megatron.config import ConfigError
from mesh_megatron.training import arguments
from mesh_megatron.training import trainer as _trainer  # noqa: F401  (import-time warnings now, not in a test's stderr)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tiny_dataset(tmp_path):
    """A real indexed dataset (.bin/.idx) written with megatron-core's builder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for n in (50, 60, 70):
        builder.add_document(np.arange(n, dtype=np.int32) % 100, [n])
    builder.finalize(prefix + ".idx")
    return prefix


def write(path, text):
    path.write_text(text)
    return str(path)


def parse(argv, world=1):
    return arguments.parse(["--ds_config", os.path.join(ROOT, "examples/zero2.json")] + argv, world_size=world)


def test_defaults_parse(tmp_path):
    # --save under tmp_path: the default (checkpoints/embedded-default) may hold `make train`'s
    # run, which a run without --load refuses to reuse.
    run = parse(["--save", str(tmp_path / "ck")])
    assert run.train.global_batch_size == 16 and run.ds_config["gradient_accumulation_steps"] == 2
    assert run.model.vocab_size == 4096  # the embedded tokenizer's vocabulary


def test_bad_inputs_each_give_one_clear_error(tmp_path, tiny_dataset):
    sp = os.path.join(ROOT, "mesh_megatron/data/corpus/tokenizer.model")
    data = ["--tokenizer-type", "sentencepiece", "--tokenizer-model", sp]
    truncated = str(tmp_path / "trunc")
    with open(tiny_dataset + ".bin", "rb") as f:
        payload = f.read()
    open(truncated + ".bin", "wb").write(payload[:-40])
    open(truncated + ".idx", "wb").write(open(tiny_dataset + ".idx", "rb").read())
    idx_only = str(tmp_path / "idxonly")
    open(idx_only + ".idx", "wb").write(open(tiny_dataset + ".idx", "rb").read())
    small_vocab = write(tmp_path / "small.yaml", "preset: tiny\nvariant: mesh\nvocab_size: 100\n")
    mismatch = write(tmp_path / "mismatch.json", json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    not_json = write(tmp_path / "bad.json", "{stage: 2,}")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_sp = tmp_path / "bad.model"
    bad_sp.write_bytes(b"not a sentencepiece model")
    a_file = write(tmp_path / "a_file", "x")
    torn = torn_checkpoint(tmp_path / "torn")
    cases = [
        (["--data-path", str(tmp_path / "nope")] + data,
         f"no indexed dataset at prefix {tmp_path}/nope: neither .*nope.bin nor .*nope.idx exists"),
        (["--data-path", idx_only] + data, r"idxonly.idx exists but .*idxonly.bin is missing \(.idx without .bin\)"),
        (["--data-path", truncated] + data, "trunc.bin is truncated: .* describes 180 tokens"),
        (["--config", small_vocab], r"tokenizer vocab \(4096\) is larger than the model's padded vocab \(128"),
        (["--ds_config", mismatch, "--global-batch-size", "16"], "batch sizes disagree: .* train_batch_size=32 but --global-batch-size is 16"),
        (["--ds_config", not_json], f"--ds_config {not_json} is not JSON: Expecting property name .* at line 1 column 2"),
        (["--tokenizer-type", "sentencepiece", "--tokenizer-model", str(bad_sp)],
         f"sentencepiece tokenizer file {bad_sp} could not be read .*pass the path of a sentencepiece .model file"),
        (["--tokenizer-type", "hf", "--tokenizer-model", str(bad_sp)],
         f"Hugging Face tokenizer.json {bad_sp} could not be read"),
        (["--load", str(empty)], f"--load {empty} holds no checkpoint \\(no 'latest' file\\)"),
        (["--load", torn], f"--load {torn}: 'latest' names 'iter_0000004', but mp_rank_00_model_states.pt is 3 "
                           "bytes, the manifest says 700 .*the previous loadable checkpoint is iter_0000002"),
        (["--tensor-model-parallel-size", "2"], "larger than the world size 1"),
        (["--layout", "2+2x2+2"], "layout '2\\+2x2\\+2' is malformed: write P\\+CrK\\+Q"),
        (["--global-batch-size", "10", "--micro-batch-size", "4"], "not a multiple of micro-batch 4"),
        (["--exit-duration-in-mins", "-1"], "--exit-duration-in-mins -1.0 is negative"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            parse(argv + ["--save", str(tmp_path / "out")])
        assert "\n" not in str(e.value), argv  # one line
        assert not (tmp_path / "out").exists(), argv
    for save, message in [(a_file, f"--save {a_file}: is a file, not a directory; pass a directory path"),
                          (a_file + "/sub", f"--save {a_file}/sub: cannot be created, {a_file} is a file"),
                          (torn, f"--save {torn} already holds checkpoints \\(latest iter_0000004\\) of another run: "
                                 f"resume it with --load {torn}, pass another --save directory, or --overwrite-save")]:
        with pytest.raises(ConfigError, match=message):
            parse(["--save", save])


def torn_checkpoint(save):
    """A run's directory (iterations 2 and 4) whose latest model file lost its tail."""
    from mesh_megatron.checkpoint.manager import CheckpointManager, tag_for
    from mesh_megatron.config import ParallelConfig, preset

    m = CheckpointManager(str(save), 5, ParallelConfig(), "sentencepiece",
                          os.path.join(ROOT, "mesh_megatron/data/corpus/tokenizer.model"), run_id="r")
    for it in (2, 4):
        assert m._prepare(tag_for(it)) == "save"
        (save / tag_for(it) / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)
        m._finish(tag_for(it), it, preset("tiny", "mesh"), {})
    (save / tag_for(4) / "mp_rank_00_model_states.pt").write_bytes(b"wei")
    return str(save)


def listing(directory):
    return sorted((os.path.relpath(os.path.join(r, n), directory), os.path.getsize(os.path.join(r, n)))
                  for r, _, names in os.walk(directory) for n in names)


def test_entry_point_prints_one_line_and_writes_nothing(tmp_path, capsys):
    """Through pretrain_mesh.py's main(): exit status 2, exactly one line on stderr, and neither
    a new --save directory nor any change to an existing one."""
    from mesh_megatron.training.run import main

    torn = torn_checkpoint(tmp_path / "torn")
    before = listing(torn)
    not_json = write(tmp_path / "bad.json", "{stage: 2,}")
    a_file = write(tmp_path / "a_file", "x")
    cases = [
        (["--ds_config", not_json, "--save", str(tmp_path / "new")], f"--ds_config {not_json} is not JSON"),
        (["--save", a_file], f"--save {a_file}: is a file, not a directory"),
        (["--variant", "base", "--train-iters", "1", "--save", torn], f"--save {torn} already holds checkpoints"),
        (["--load", torn, "--save", torn], f"--load {torn}: 'latest' names 'iter_0000004', but "
                                           "mp_rank_00_model_states.pt is 3 bytes"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(["--ds_config", os.path.join(ROOT, "examples/zero2.json")] + argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {message}"), (argv, err)
        assert not (tmp_path / "new").exists() and listing(torn) == before
    assert open(a_file).read() == "x"


def test_checkpoint_of_another_model_is_refused(tmp_path):
    from mesh_megatron.checkpoint.manager import CONFIG_FILE, LATEST
    import dataclasses
    from mesh_megatron.config import preset

    (tmp_path / "iter_0000005").mkdir()
    cfg = dataclasses.replace(preset("tiny", "base"), vocab_size=4096)
    (tmp_path / "iter_0000005" / CONFIG_FILE).write_text(json.dumps({"model": dataclasses.asdict(cfg)}))
    (tmp_path / LATEST).write_text("iter_0000005")
    save = ["--save", str(tmp_path / "new")]
    parse(["--variant", "base", "--load", str(tmp_path)] + save)  # same model: accepted
    with pytest.raises(ConfigError, match="different model config .*variant: checkpoint 'base' vs run 'mesh'"):
        parse(["--variant", "mesh", "--load", str(tmp_path)] + save)


@pytest.mark.parametrize("argv,message", [
    (["--preset", "pythia-7b"], "invalid choice: 'pythia-7b'"),
    (["--variant", "anchorr"], "invalid choice: 'anchorr'"),
])
def test_unknown_preset_or_variant(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_nan_loss_stops_with_a_message_or_skips(tmp_path):
    """A real non-finite loss (weights initialised with std 1e30), through the whole script."""
    cfg = write(tmp_path / "huge.yaml", "preset: tiny\nvariant: mesh\ninit_std: 1.0e+30\n")
    base = ["--ds_config", "examples/zero0.json", "--config", cfg,
            "--train-iters", "2", "--eval-interval", "0", "--sample-tokens", "0", "--seq-length", "32"]
    stop = run_script("pretrain_mesh.py", base + ["--save", str(tmp_path / "ck")], timeout=300)
    assert stop.returncode == 2
    assert "error: loss is nan at iteration 1: stopping" in stop.stderr
    assert not (tmp_path / "ck").exists()
    skip = run_script("pretrain_mesh.py", base + ["--nan-policy", "skip", "--save", str(tmp_path / "ck2")], timeout=300)
    assert skip.returncode == 0, skip.stderr[-2000:]
    assert "micro-batch skipped (--nan-policy skip)" in skip.stdout
