"""Every tool keeps pretrain_mesh.py's promises (mesh_megatron/paths.py): a bad output path or
a damaged input is one `error:` line and exit status 2, found before the expensive step (the
step is patched to raise: reaching it fails the test), with nothing written; outputs appear
whole or not at all (a write failing with ENOSPC leaves the old output or none, no fragment);
and a checkpoint with one flipped byte is refused by export, reshard and probe."""

import errno
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from mesh_megatron.checkpoint.writer import write_training_checkpoint
from mesh_megatron.data.embedded import EMBEDDED_TOKENIZER_MODEL
from test_export import ROOT, random_model, tiny

TAG = "iter_0000000"


def tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def listing(root):
    """Every file under root with its bytes: what 'nothing written' and 'old output intact' compare."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def one_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def flip_byte(path):
    """One byte in the middle changed, the size kept: torch.load still reads it (a tensor value
    differs), so only the manifest's SHA-256 can tell."""
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, megatron_single):
    """A checkpoint with a manifest (writer.py, as an import or a weights-only reshard writes it),
    its Hugging Face export, and a small indexed dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from mesh_megatron.conversion.to_hf import export_to_hf

    root = tmp_path_factory.mktemp("sources")
    cfg = tiny("mesh")
    state = {k: v for k, v in random_model(cfg).state_dict().items() if isinstance(v, torch.Tensor)}
    write_training_checkpoint(str(root / "ckpt"), cfg, state,
                              tokenizer=("sentencepiece", str(EMBEDDED_TOKENIZER_MODEL)))
    export_to_hf(str(root / "ckpt"), str(root / "hf"), progress=False)
    prefix = str(root / "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for n in (50, 60, 70):
        builder.add_document(np.arange(n, dtype=np.int32) % 100, [n])
    builder.finalize(prefix + ".idx")
    return {"ckpt": str(root / "ckpt"), "hf": str(root / "hf"), "data": prefix}


@pytest.fixture
def case(tmp_path, sources):
    """Per test: a file, a non-empty directory, copies of the sources that may be damaged."""
    import shutil

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("old")
    for name in ("ckpt", "hf"):
        shutil.copytree(sources[name], tmp_path / name)
    return tmp_path


@pytest.fixture
def no_expensive_step(monkeypatch):
    """Reading checkpoint weights, loading an HF model, evaluating, training: each raises."""
    def reached(*a, **k):
        raise AssertionError("the expensive step ran before the check")

    from transformers import AutoModelForCausalLM

    from mesh_megatron import evaluation
    from mesh_megatron.checkpoint import reader

    monkeypatch.setattr(reader, "_load_shard", reached)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", reached)
    monkeypatch.setattr(evaluation, "perplexity", reached)
    monkeypatch.setattr(evaluation, "run_lm_eval", reached)
    return reached


def read_only(monkeypatch):
    """Every path denies write access, as on a read-only disk (chmod does not stop root)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: not mode & os.W_OK and real(path, mode, **k))


def output_mistakes(t, flag):
    """(value of the output flag, expected message) for each mistake of a directory output."""
    return [(str(t / "a_file"), f"error: {flag} {t / 'a_file'}: is a file, not a directory; pass a directory path"),
            (str(t / "a_file" / "sub"), f"error: {flag} {t / 'a_file' / 'sub'}: cannot be created, {t / 'a_file'} "
                                        "is a file; pass another directory path"),
            (str(t / "full"), f"error: {flag} {t / 'full'}: is not empty; pass an empty or new directory, or "
                              "--force to replace it")]


def refuse_all(capsys, t, main, runs):
    """Each (argv, message prefix): exit 2, one line, and not one file changed under t."""
    before = listing(t)
    for argv, message in runs:
        assert main(argv) == 2, argv
        line = one_error(capsys)
        assert line.startswith(message), (argv, line)
        assert listing(t) == before, argv


def test_convert_to_hf(case, capsys, no_expensive_step, monkeypatch):
    t, main = case, tool("convert_to_hf").main
    flip_byte(t / "ckpt" / TAG / "mp_rank_00_model_states.pt")
    good = str(t / "good_ckpt")
    runs = [(["--load", str(t / "hf"), "--out", out, "--quiet"], msg) for out, msg in output_mistakes(t, "--out")]
    runs += [
        (["--load", str(t / "ckpt"), "--out", str(t / "new")],
         f"error: --load {t / 'ckpt'}: checkpoint {TAG} is damaged (mp_rank_00_model_states.pt does not match "
         "its SHA-256 in the manifest (corrupt))"),
        (["--load", str(t / "a_file"), "--out", str(t / "new")], f"error: --load {t / 'a_file'}: is a file, not a directory"),
        (["--load", good, "--out", str(t / "new")], f"error: --load {good}: does not exist"),
    ]
    refuse_all(capsys, t, main, runs)
    read_only(monkeypatch)
    refuse_all(capsys, t, main, [(["--load", str(t / "ckpt"), "--out", str(t / "new")],
                                  f"error: --out {t / 'new'}: not writable ({t} denies write access)")])


def test_convert_checkpoint(case, capsys, no_expensive_step):
    t, main = case, tool("convert_checkpoint").main
    ckpt = str(t / "ckpt")
    runs = [(["--load", ckpt, "--save", out, "--weights-only"], msg) for out, msg in output_mistakes(t, "--save")]
    runs.append((["--load", ckpt, "--save", str(t / "ckpt" / "inside"), "--weights-only"],
                 f"error: --save {t / 'ckpt' / 'inside'}: overlaps the source"))
    refuse_all(capsys, t, main, runs)
    model_file = t / "ckpt" / TAG / "mp_rank_00_model_states.pt"
    flip_byte(model_file)
    refuse_all(capsys, t, main, [(["--load", ckpt, "--save", str(t / "new"), "--weights-only"],
                                  f"error: --load {ckpt}: checkpoint {TAG} is damaged (mp_rank_00_model_states.pt "
                                  "does not match its SHA-256")])
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated: caught by its size, no hashing needed
    refuse_all(capsys, t, main, [(["--load", ckpt, "--save", str(t / "new"), "--weights-only"],
                                  f"error: --load {ckpt}: 'latest' names '{TAG}', but mp_rank_00_model_states.pt is "
                                  "100 bytes")])


def test_probe_mesh(case, capsys, no_expensive_step):
    t, main = case, tool("probe_mesh").main
    runs = [(["--load", str(t / "ckpt"), "--out", out], msg) for out, msg in output_mistakes(t, "--out")]
    flip_byte(t / "ckpt" / TAG / "mp_rank_00_model_states.pt")
    weights = t / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    runs += [(["--load", str(t / "ckpt"), "--out", str(t / "new")],
              f"error: --load {t / 'ckpt'}: checkpoint {TAG} is damaged (mp_rank_00_model_states.pt does not match"),
             (["--load", str(t / "hf"), "--out", str(t / "new")],
              f"error: --load {weights}: is {weights.stat().st_size} bytes but its safetensors header describes "
              f"{weights.stat().st_size + 10} (truncated or overwritten)")]
    refuse_all(capsys, t, main, runs)


def test_eval_lm(case, sources, capsys, no_expensive_step):
    t, main = case, tool("eval_lm").main
    base = ["--perplexity-data", sources["data"], "--offline"]
    (t / "old.json").write_text("{}")
    runs = [(["--model-dir", str(t / "hf"), "--output", str(t / "full")] + base,
             f"error: --output {t / 'full'}: is a directory, not a file; pass a file path"),
            (["--model-dir", str(t / "hf"), "--output", str(t / "a_file" / "r.json")] + base,
             f"error: --output {t / 'a_file' / 'r.json'}: cannot be created, {t / 'a_file'} is a file"),
            (["--model-dir", str(t / "hf"), "--output", str(t / "old.json")] + base,
             f"error: --output {t / 'old.json'}: exists; pass a new file path, or --force to replace it"),
            (["--model-dir", str(t / "hf"), "--output", str(t / "r.json"), "--perplexity-data", str(t / "nope")],
             f"error: --perplexity-data: no indexed dataset at prefix {t / 'nope'}")]
    (t / "hf" / "config.json").write_text('{"model_type": "mesh_gpt')  # torn
    runs.append((["--model-dir", str(t / "hf"), "--output", str(t / "r.json")] + base,
                 f"error: --model-dir {t / 'hf' / 'config.json'}: is not valid JSON"))
    refuse_all(capsys, t, main, runs[-1:])
    (t / "hf" / "config.json").write_text(open(os.path.join(sources["hf"], "config.json")).read())
    refuse_all(capsys, t, main, runs[:-1])


def test_ablate(case, capsys, monkeypatch):
    t, ablate = case, tool("ablate")
    monkeypatch.chdir(t)  # main() moves to the repository; restored after the test

    def reached(*a, **k):
        raise AssertionError("training started before the check")

    monkeypatch.setattr(ablate, "train_all", reached)
    quick = ["--quick", "--runs-dir", str(t / "runs")]
    runs = [(["--quick", "--out", str(t / "a_file")], f"error: --out {t / 'a_file'}: is a file, not a directory"),
            (["--quick", "--out", str(t / "a_file" / "sub")], f"error: --out {t / 'a_file' / 'sub'}: cannot be created"),
            (quick + ["--out", str(t / "full")], f"error: --out {t / 'full'}: is not empty and holds no recipe.yaml"),
            (["--quick", "--out", str(t / "new"), "--runs-dir", str(t / "a_file")],
             f"error: --runs-dir {t / 'a_file'}: is a file, not a directory"),
            (quick + ["--out", str(t / "new"), "--data-path", str(t / "nope")],
             f"error: --data-path: no indexed dataset at prefix {t / 'nope'}")]
    refuse_all(capsys, t, ablate.main, runs)


def test_model_summary_and_pretrain(case, capsys, monkeypatch):
    t = case
    (t / "bad.yaml").write_text("model:\n  hidden_size: 64: x\n")
    runs = [(["--config", str(t / "full")], f"error: --config {t / 'full'}: is a directory, not a file"),
            (["--config", str(t / "nope.yaml")], f"error: --config {t / 'nope.yaml'}: does not exist"),
            (["--config", str(t / "bad.yaml")], f"error: {t / 'bad.yaml'}:2: malformed YAML")]
    refuse_all(capsys, t, tool("model_summary").main, runs)

    from mesh_megatron.training.run import main

    read_only(monkeypatch)
    refuse_all(capsys, t, main, [(["--ds_config", os.path.join(ROOT, "examples/zero2.json"),
                                   "--save", str(t / "new")],
                                  f"error: --save {t / 'new'}: not writable ({t} denies write access)")])


def enospc_after(monkeypatch, module, name, calls_ok):
    """Patch module.name so that, after `calls_ok` good calls, it writes half a file and
    raises ENOSPC, as a full disk does mid-write."""
    original = getattr(module, name)
    count = {"n": 0}

    def write(obj, path, *a, **k):
        count["n"] += 1
        if count["n"] > calls_ok:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, path, *a, **k)

    monkeypatch.setattr(module, name, write)


def test_disk_full_leaves_the_old_output_or_none(case, capsys, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    from mesh_megatron.checkpoint import writer

    t = case
    export, reshard = tool("convert_to_hf").main, tool("convert_checkpoint").main
    assert export(["--load", str(t / "ckpt"), "--out", str(t / "old_hf"), "--quiet"]) == 0
    assert reshard(["--load", str(t / "ckpt"), "--save", str(t / "old_tp2"), "--weights-only",
                    "--tensor-model-parallel-size", "2"]) == 0
    capsys.readouterr()
    before = listing(t)
    with monkeypatch.context() as m:
        enospc_after(m, modeling_utils, "safe_save_file", 0)
        enospc_after(m, writer.torch, "save", 1)  # the second TP shard fails
        for argv, main in [(["--load", str(t / "ckpt"), "--out", str(t / "new_hf"), "--quiet"], export),
                           (["--load", str(t / "ckpt"), "--out", str(t / "old_hf"), "--quiet", "--force"], export),
                           (["--load", str(t / "ckpt"), "--save", str(t / "new_tp2"), "--weights-only",
                             "--tensor-model-parallel-size", "2"], reshard),
                           (["--load", str(t / "ckpt"), "--save", str(t / "old_tp2"), "--weights-only",
                             "--tensor-model-parallel-size", "2", "--force"], reshard)]:
            assert main(argv) == 2, argv
            assert "writing failed (the disk is full); nothing was replaced there" in one_error(capsys), argv
            assert listing(t) == before, argv  # no new output, no fragment, the old output intact
    # With room again, --force replaces the old export only now, whole.
    assert export(["--load", str(t / "ckpt"), "--out", str(t / "old_hf"), "--quiet", "--force"]) == 0
    assert sorted(os.listdir(t / "old_hf")) == sorted(os.listdir(t / "hf"))
    assert not [n for n in os.listdir(t) if ".partial-" in n or ".old-" in n]
    # The resharded copy of a verified checkpoint is itself verified: its own manifest.
    assert json.load(open(t / "old_tp2" / TAG / "manifest.json"))["files"].keys() >= {
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"}
