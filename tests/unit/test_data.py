"""Data side: tokenizers, preprocess -> indexed dataset, GPT dataset building, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from mesh_megatron.data.cpp_helpers import ensure_helpers_cpp
from mesh_megatron.data.datasets import build_gpt_datasets, parse_blend
from mesh_megatron.data.embedded import (
    EMBEDDED_CORPUS,
    EMBEDDED_TOKENIZER_MODEL,
    embedded_tokenizer,
    prepare_embedded_dataset,
)
from mesh_megatron.data.preprocessing import iter_documents, preprocess
from mesh_megatron.data.tokenizer import HFTokenizer, SentencePieceTokenizer, build_tokenizer
from mesh_megatron.data.validation import check_token_ids, inspect_indexed_dataset
from mesh_megatron.data.vocab import check_vocab_fits, pad_vocab_size

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tools" / "preprocess_data.py"
SP_MODEL = str(EMBEDDED_TOKENIZER_MODEL)

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, trailing spaces and  double  spaces.  ",
    "Line one.\nLine two.\n\nA new paragraph after a blank line.",
    "Unicode survives: café, naïve, 東京, emoji 🤖, tab\there.",
    "Numbers 12345 and symbols {}[]()<>=+-*/%$#@!~`|\\^ are fine.",
    "x",
]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for text in texts:
            out.write(json.dumps({key: text}, ensure_ascii=False) + "\n")
    return path


def corpus_texts(limit: int | None = None) -> list[str]:
    with open(EMBEDDED_CORPUS, encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines][:limit]


def output_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="module")
def sp_tokenizer() -> SentencePieceTokenizer:
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two small real datasets: the whole embedded corpus and a 600-document slice."""
    root = tmp_path_factory.mktemp("prefixes")
    full = str(root / "full")
    preprocess(EMBEDDED_CORPUS, full, "sentencepiece", SP_MODEL, append_eod=True)
    part = write_jsonl(root / "part.jsonl", corpus_texts(600))
    preprocess(part, str(root / "part"), "sentencepiece", SP_MODEL, append_eod=True)
    return full, str(root / "part")


# ------------------------------------------------------------------------- tokenizers


def test_sentencepiece_tokenizer_interface(sp_tokenizer: SentencePieceTokenizer) -> None:
    assert sp_tokenizer.vocab_size == 4096
    assert sp_tokenizer.eod == 2  # </s>
    for text in DOCS:
        assert sp_tokenizer.detokenize(sp_tokenizer.tokenize(text)) == text
    assert sp_tokenizer.eod not in sp_tokenizer.tokenize("".join(DOCS))


def test_embedded_corpus_is_shipped_and_licensed() -> None:
    corpus_dir = EMBEDDED_CORPUS.parent
    assert 1_000_000 <= EMBEDDED_CORPUS.stat().st_size <= 4_000_000
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (corpus_dir / "LICENSE").read_text()
    assert "PSF" in (corpus_dir / "README.md").read_text()


def make_tokenizer_json(path: Path) -> Path:
    """A tiny byte-level BPE in the layout of GPT-NeoX-20B's tokenizer.json (Pythia's):
    NFC normaliser, ByteLevel pre-tokenizer/decoder, <|endoftext|>=0, <|padding|>=1,
    an added token above the base vocab, and merges stored as "a b" strings."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(200) + DOCS, trainer)
    tok.add_tokens([AddedToken("        ", normalized=False)])  # NeoX adds space runs
    tok.save(str(path))
    spec = json.loads(path.read_text())
    spec["model"]["merges"] = [
        " ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]
    ]
    path.write_text(json.dumps(spec))
    return path


def test_hf_tokenizer_json_round_trip(tmp_path: Path) -> None:
    tokenizer_json = make_tokenizer_json(tmp_path / "tokenizer.json")
    tok = build_tokenizer("hf", tokenizer_json)
    assert isinstance(tok, HFTokenizer)
    assert tok.eod == 0 and tok.pad == 1
    vocab = json.loads(tokenizer_json.read_text())
    assert tok.vocab_size == max(t["id"] for t in vocab["added_tokens"]) + 1
    for text in DOCS:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert HFTokenizer(tmp_path).path == str(tokenizer_json.resolve())  # a model dir works

    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prefix = str(tmp_path / "out" / "hf")
    preprocess(data, prefix, "hf", tokenizer_json, workers=2, append_eod=True)
    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(DOCS)
    for i, text in enumerate(DOCS):
        assert dataset[i][-1] == tok.eod
        assert tok.detokenize(dataset[i][:-1]) == text


def test_hf_tokenizer_without_eod_needs_one(tmp_path: Path) -> None:
    tokenizer_json = make_tokenizer_json(tmp_path / "tokenizer.json")
    spec = json.loads(tokenizer_json.read_text())
    for added in spec["added_tokens"]:
        if added["content"] == "<|endoftext|>":
            added["content"] = "<|begin|>"
    spec["model"]["vocab"]["<|begin|>"] = spec["model"]["vocab"].pop("<|endoftext|>")
    tokenizer_json.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="has no end-of-document token"):
        HFTokenizer(tokenizer_json)
    assert HFTokenizer(tokenizer_json, eod_token="<|begin|>").eod == 0


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, padded",
    [
        (50257, 128, 1, 50304),  # GPT-2
        (50257, 128, 2, 50432),
        (50257, 128, 4, 50688),
        (50277, 128, 1, 50304),  # GPT-NeoX-20B / Pythia
        (4096, 128, 1, 4096),  # already a multiple
        (4097, 128, 1, 4224),
        (32000, 64, 8, 32256),
        (1, 1, 1, 1),
    ],
)
def test_pad_vocab_size(vocab: int, divisible_by: int, tp: int, padded: int) -> None:
    assert pad_vocab_size(vocab, divisible_by, tp) == padded


def test_check_vocab_fits() -> None:
    check_vocab_fits(50277, 50304)
    check_vocab_fits(50304, 50304)
    with pytest.raises(ValueError, match=r"tokenizer vocab \(50305 ids\) is larger"):
        check_vocab_fits(50305, 50304)


# ----------------------------------------------------------------------- preprocessing


def test_preprocess_jsonl_round_trip_two_workers(tmp_path: Path, sp_tokenizer) -> None:
    texts = DOCS + corpus_texts(60)
    data = write_jsonl(tmp_path / "docs.jsonl", texts)
    prefix = str(tmp_path / "out" / "docs")
    result = preprocess(data, prefix, "sentencepiece", SP_MODEL, workers=2, append_eod=True)
    assert result.documents == len(texts) and result.skipped_empty == 0

    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(texts)
    assert dataset[0].dtype == numpy.uint16  # 4096 ids fit, as megatron would choose
    for i, text in enumerate(texts):
        assert dataset[i][-1] == sp_tokenizer.eod
        assert sp_tokenizer.detokenize(dataset[i][:-1]) == text
    assert sum(len(dataset[i]) for i in range(len(dataset))) == result.tokens
    assert output_files(tmp_path / "out") == ["docs.bin", "docs.idx"]  # no temp left


def test_preprocess_text_file_blank_line_documents(tmp_path: Path, sp_tokenizer) -> None:
    data = tmp_path / "docs.txt"
    data.write_text("First doc,\nsecond line.\n\n\n  \nSecond doc.\n\nThird doc", "utf-8")
    prefix = str(tmp_path / "txt")
    preprocess(data, prefix, "sentencepiece", SP_MODEL, workers=2)
    expected = ["First doc,\nsecond line.", "Second doc.", "Third doc"]
    assert list(iter_documents(data)) == expected
    dataset = IndexedDataset(prefix)
    assert [sp_tokenizer.detokenize(dataset[i]) for i in range(len(dataset))] == expected


def test_preprocess_skips_empty_documents(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "docs.jsonl", ["a", "", "b"])
    result = preprocess(data, str(tmp_path / "o"), "sentencepiece", SP_MODEL)
    assert (result.documents, result.skipped_empty) == (2, 1)


def load_cli():
    spec = importlib.util.spec_from_file_location("preprocess_data_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_explains_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, str(CLI), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--input",
        "--output-prefix",
        "--tokenizer-type",
        "--tokenizer-model",
        "--json-key",
        "--workers",
        "--append-eod",
    ):
        assert flag in out


def test_cli_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS, key="body")
    prefix = tmp_path / "cli"
    load_cli().main(
        [
            "--input",
            str(data),
            "--output-prefix",
            str(prefix),
            "--tokenizer-type",
            "sentencepiece",
            "--tokenizer-model",
            SP_MODEL,
            "--json-key",
            "body",
            "--workers",
            "2",
            "--append-eod",
        ]
    )
    assert f"{len(DOCS)} documents" in capsys.readouterr().out
    assert inspect_indexed_dataset(prefix).documents == len(DOCS)


# -------------------------------------------------------------------- GPT datasets


def test_helpers_cpp_available() -> None:
    assert ensure_helpers_cpp() == "prebuilt"  # the 0.16.1 wheel ships it compiled


def sample_tokens(dataset, count: int = 8) -> list[list[int]]:
    return [dataset[i]["tokens"].tolist() for i in range(count)]


def test_gpt_datasets_samples_and_determinism(tmp_path: Path, prefixes, sp_tokenizer) -> None:
    full, _ = prefixes
    kwargs = dict(
        split="969,30,1",
        seq_length=32,
        train_samples=64,
        valid_samples=8,
        tokenizer=sp_tokenizer,
        padded_vocab_size=pad_vocab_size(4096),
    )
    first = build_gpt_datasets([full], seed=1234, cache_dir=tmp_path / "c1", **kwargs)
    assert first.test is None  # 0 test samples asked: not built
    assert len(first.train) >= 64 and len(first.valid) >= 8
    sample = first.train[0]
    assert set(sample) >= {"tokens", "labels", "loss_mask", "position_ids"}
    assert sample["tokens"].shape == sample["labels"].shape == (32,)
    # labels are the next tokens: each sample reads seq_length + 1 tokens.
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])

    again = build_gpt_datasets([full], seed=1234, cache_dir=tmp_path / "c2", **kwargs)
    assert sample_tokens(again.train) == sample_tokens(first.train)
    assert sample_tokens(again.valid) == sample_tokens(first.valid)
    other = build_gpt_datasets([full], seed=99, cache_dir=tmp_path / "c1", **kwargs)
    assert sample_tokens(other.train) != sample_tokens(first.train)
    assert any(p.name.endswith("shuffle_index.npy") for p in (tmp_path / "c1").iterdir())


def test_gpt_datasets_weighted_blend(tmp_path: Path, prefixes, sp_tokenizer) -> None:
    full, part = prefixes
    datasets = build_gpt_datasets(
        ["0.7", full, "0.3", part],
        split="969,30,1",
        seq_length=32,
        seed=1,
        train_samples=200,
        valid_samples=10,
        test_samples=0,
        tokenizer=sp_tokenizer,
        cache_dir=tmp_path,
    )
    train = datasets.train
    assert len(train) == 200
    counts = numpy.bincount(numpy.asarray(train.dataset_index), minlength=2)
    assert abs(counts[0] - 140) <= 1 and abs(counts[1] - 60) <= 1
    assert train[0]["tokens"].shape == (32,)
    # Unweighted paths: weighted by size, still sized to the request (megatron rounds
    # each part up, so a blend can be a sample or so longer; it caps at one epoch).
    unweighted = build_gpt_datasets(
        [full, part],
        split="969,30,1",
        seq_length=32,
        seed=1,
        train_samples=5000,
        valid_samples=10,
        tokenizer=sp_tokenizer,
        cache_dir=tmp_path,
    )
    assert 5000 <= len(unweighted.train) <= 5001


def test_gpt_datasets_with_and_without_process_group(
    tmp_path: Path, prefixes, sp_tokenizer
) -> None:
    """Same samples whether or not torch.distributed (gloo) is initialised. In a full
    test run another fixture may already hold a process group; then only that side runs."""
    full, part = prefixes
    kwargs = dict(
        data_path=["0.5", full, "0.5", part],
        split="969,30,1",
        seq_length=16,
        seed=7,
        train_samples=40,
        valid_samples=4,
        tokenizer=sp_tokenizer,
    )
    group_already_there = torch.distributed.is_initialized()
    if group_already_there:
        reference = build_gpt_datasets(cache_dir=tmp_path / "first", **kwargs)
    else:
        reference = build_gpt_datasets(cache_dir=tmp_path / "plain", **kwargs)
        assert not torch.distributed.is_initialized()  # the temporary group is gone again
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
        )
    try:
        with_group = build_gpt_datasets(cache_dir=tmp_path / "dist", **kwargs)
    finally:
        if not group_already_there:
            torch.distributed.destroy_process_group()
    assert sample_tokens(with_group.train) == sample_tokens(reference.train)


def test_parse_blend() -> None:
    assert parse_blend(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_blend("a b") == (["a", "b"], None)
    with pytest.raises(ValueError, match="weights must be positive"):
        parse_blend(["0", "a", "1", "b"])


# ---------------------------------------------------------------- embedded default


def test_embedded_prepare_is_idempotent(tmp_path: Path) -> None:
    prefix = prepare_embedded_dataset(tmp_path)
    info = inspect_indexed_dataset(prefix)
    assert info.documents == 1443
    stamps = [os.stat(prefix + ext) for ext in (".bin", ".idx")]
    assert prepare_embedded_dataset(tmp_path) == prefix
    again = [os.stat(prefix + ext) for ext in (".bin", ".idx")]
    assert [(s.st_ino, s.st_mtime_ns) for s in again] == [(s.st_ino, s.st_mtime_ns) for s in stamps]
    assert output_files(Path(prefix).parent) == sorted(
        Path(prefix + ext).name for ext in (".bin", ".idx")
    )

    # A damaged cache (crash of some other tool, disk trouble) is rebuilt, not trusted.
    with open(prefix + ".bin", "r+b") as stream:
        stream.truncate(100)
    assert prepare_embedded_dataset(tmp_path) == prefix
    assert inspect_indexed_dataset(prefix).tokens == info.tokens


# ------------------------------------------------------------------ bad input table


def _preprocess_into(out: Path, data: Path, **kwargs) -> None:
    preprocess(
        data,
        str(out / "x"),
        kwargs.pop("type", "sentencepiece"),
        kwargs.pop("model", SP_MODEL),
        workers=2,
        **kwargs,
    )


def bad_missing_input(tmp: Path, out: Path) -> None:
    _preprocess_into(out, tmp / "nope.jsonl")


def bad_json_line(tmp: Path, out: Path) -> None:
    texts = corpus_texts(40)
    lines = [json.dumps({"text": t}) for t in texts] + ['{"text": "unterminated']
    (tmp / "bad.jsonl").write_text("\n".join(lines) + "\n")
    _preprocess_into(out, tmp / "bad.jsonl")


def bad_missing_key(tmp: Path, out: Path) -> None:
    (tmp / "nokey.jsonl").write_text('{"text": "fine"}\n{"body": "wrong key"}\n')
    _preprocess_into(out, tmp / "nokey.jsonl")


def bad_tokenizer_file(tmp: Path, out: Path) -> None:
    _preprocess_into(out, write_jsonl(tmp / "ok.jsonl", DOCS), model=tmp / "none.model")


def bad_tokenizer_content(tmp: Path, out: Path) -> None:
    (tmp / "junk.json").write_text("not json at all")
    _preprocess_into(out, write_jsonl(tmp / "ok.jsonl", DOCS), type="hf", model=tmp / "junk.json")


def _good_prefix(out: Path) -> str:
    prefix = str(out / "good")
    preprocess(write_jsonl(out.parent / "good.jsonl", DOCS), prefix, "sentencepiece", SP_MODEL)
    return prefix


def bad_idx_without_bin(tmp: Path, out: Path) -> None:
    prefix = _good_prefix(out)
    os.remove(prefix + ".bin")
    build_gpt_datasets([prefix], "1,0,0", 8, 1, 4, 0, embedded_tokenizer(), cache_dir=tmp)


def bad_truncated_bin(tmp: Path, out: Path) -> None:
    prefix = _good_prefix(out)
    with open(prefix + ".bin", "r+b") as stream:
        stream.truncate(os.path.getsize(prefix + ".bin") - 6)
    build_gpt_datasets([prefix], "1,0,0", 8, 1, 4, 0, embedded_tokenizer(), cache_dir=tmp)


def bad_vocab_too_large(tmp: Path, out: Path) -> None:
    prefix = _good_prefix(out)
    build_gpt_datasets(
        [prefix], "1,0,0", 8, 1, 4, 0, embedded_tokenizer(), cache_dir=tmp, padded_vocab_size=2048
    )


def bad_token_id_too_large(tmp: Path, out: Path) -> None:
    prefix = _good_prefix(out)  # its ids go up to ~4000
    check_token_ids(inspect_indexed_dataset(prefix), padded_vocab=100)


def bad_empty_split(tmp: Path, out: Path) -> None:
    prefix = _good_prefix(out)  # 6 documents: "969,30,1" leaves the test split none
    build_gpt_datasets(
        [prefix], "969,30,1", 8, 1, 4, 0, embedded_tokenizer(), cache_dir=tmp, test_samples=2
    )


def bad_split_string(tmp: Path, out: Path) -> None:
    prefix = _good_prefix(out)
    build_gpt_datasets([prefix], "98,-2", 8, 1, 4, 0, embedded_tokenizer(), cache_dir=tmp)


BAD_INPUTS = [
    (bad_missing_input, FileNotFoundError, r"input file .*nope\.jsonl does not exist"),
    (bad_json_line, ValueError, r"bad\.jsonl line 41: bad JSON"),
    (bad_missing_key, ValueError, r"nokey\.jsonl line 2: missing key 'text'"),
    (
        bad_tokenizer_file,
        ValueError,
        r"sentencepiece tokenizer file .*none\.model does not "
        r"exist\. Fix: pass",
    ),
    (bad_tokenizer_content, ValueError, r"tokenizer\.json .*junk\.json could not be read"),
    (
        bad_idx_without_bin,
        ValueError,
        r"good\.idx exists but .*good\.bin is missing "
        r"\(\.idx without \.bin\)",
    ),
    (bad_truncated_bin, ValueError, r"good\.bin is truncated: .*\.idx describes \d+ tokens"),
    (
        bad_vocab_too_large,
        ValueError,
        r"tokenizer vocab \(4096 ids\) is larger than the "
        r"model's padded vocab \(2048\)",
    ),
    (
        bad_token_id_too_large,
        ValueError,
        r"holds token id \d+ but the model's padded vocab "
        r"is 100",
    ),
    (bad_empty_split, ValueError, r"the test split of .*good gets no tokens"),
    (bad_split_string, ValueError, r"bad split '98,-2': expected one to three non-negative"),
]


@pytest.mark.parametrize(
    "make_bad, error, message", BAD_INPUTS, ids=[case[0].__name__ for case in BAD_INPUTS]
)
def test_bad_input(tmp_path: Path, make_bad, error, message) -> None:
    out = tmp_path / "out"
    out.mkdir()
    before = output_files(out)
    with pytest.raises(error, match=message) as caught:
        make_bad(tmp_path, out)
    assert "\n" not in str(caught.value)  # one clear line, no traceback dump
    after = set(output_files(out)) - {"good.bin", "good.idx"}
    assert after == set(before)  # no partial or temporary .bin/.idx left behind


def test_cli_bad_input_is_one_message(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(SystemExit) as caught:
        load_cli().main(
            [
                "--input",
                str(tmp_path / "bad.jsonl"),
                "--output-prefix",
                str(tmp_path / "o" / "x"),
                "--tokenizer-type",
                "sentencepiece",
                "--tokenizer-model",
                SP_MODEL,
                "--workers",
                "2",
            ]
        )
    assert caught.value.code.startswith("preprocess_data.py: error: ")
    assert "line 2: bad JSON" in caught.value.code
    assert output_files(tmp_path / "o") == []
