"""Tokenizers: a sentencepiece ``.model`` and a Hugging Face ``tokenizer.json``.

Both are megatron-core ``MegatronTokenizerText`` objects, so megatron's datasets take them
as they are (``GPTDatasetConfig.tokenizer`` reads ``eod``, ``pad``, ``vocab_size`` and
``unique_identifiers``). The interface the rest of mesh-megatron uses is small:

    tokenizer.vocab_size          number of ids (max id + 1), before model padding
    tokenizer.eod                 end-of-document id appended between documents
    tokenizer.tokenize(text)      -> list[int]
    tokenizer.detokenize(ids)     -> str

The sentencepiece side reuses megatron-core's own wrapper (library "sentencepiece").
megatron's Hugging Face wrapper goes through ``transformers.AutoTokenizer`` and wants a
model directory, so a bare ``tokenizer.json`` is read with the ``tokenizers`` library
through a small library class plugged into the same ``MegatronTokenizerText`` shell.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy
from megatron.core.tokenizers.text.libraries.abstract_tokenizer import (
    MegatronTokenizerTextAbstract,
)
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

TOKENIZER_TYPES = ("sentencepiece", "hf")

# Looked up in order; GPT-NeoX / Pythia / GPT-2 use "<|endoftext|>".
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")


def _existing_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """Resolve ``path`` or raise the one clear error a user can act on."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        state = "is a directory, not a file" if resolved.is_dir() else "does not exist"
        raise ValueError(f"{what} file {resolved} {state}. Fix: {fix}")
    if not os.access(resolved, os.R_OK):
        raise ValueError(f"{what} file {resolved} is not readable. Fix: {fix}")
    return resolved.resolve()


class SentencePieceTokenizer(MegatronTokenizerText):
    """A sentencepiece ``.model``; EOD is the model's ``</s>`` (eos) piece."""

    FIX = "pass the path of a sentencepiece .model file (--tokenizer-model)."

    def __init__(self, model_path: str | os.PathLike) -> None:
        path = _existing_file(model_path, "sentencepiece tokenizer", self.FIX)
        try:
            super().__init__(str(path), {"library": "sentencepiece"})
        except Exception as error:  # sentencepiece raises RuntimeError/OSError on bad files
            raise ValueError(
                f"sentencepiece tokenizer file {path} could not be read ({error}). Fix: {self.FIX}"
            ) from error
        if self.eod < 0:
            raise ValueError(
                f"sentencepiece tokenizer file {path} has no eos piece to use as the "
                "end-of-document token. Fix: train it with eos_id >= 0."
            )


class _MissingEod(LookupError):
    """Raised inside megatron's constructor; HFTokenizer turns it into a ValueError."""


class _TokenizerJson(MegatronTokenizerTextAbstract):
    """megatron-core library class around ``tokenizers.Tokenizer.from_file``."""

    def __init__(self, path: str, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(path)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self._vocab = vocab
        # Added tokens may sit above the base vocab, so size by the largest id.
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        names = (eod_token,) if eod_token else EOD_CANDIDATES
        self.eod_id = next((vocab[name] for name in names if name in vocab), None)
        if self.eod_id is None:
            raise _MissingEod(f"none of {list(names)} is in the vocabulary")
        self._pad_id = next(
            (vocab[n] for n in PAD_CANDIDATES if n in vocab and vocab[n] != self.eod_id), None
        )

    # -- text <-> ids; no template specials: the dataset appends EOD itself
    def text_to_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def ids_to_text(self, ids: Sequence[int]) -> str:
        if isinstance(ids, numpy.ndarray):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def text_to_tokens(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def tokens_to_text(self, tokens: Sequence[str]) -> str:
        return self.ids_to_text(self.tokens_to_ids(tokens))

    def tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.tokenizer.token_to_id(token) for token in tokens]

    def ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.id_to_token(int(i)) for i in ids]

    def add_special_tokens(self, special_tokens: Any) -> None:
        raise NotImplementedError("edit the tokenizer.json to add special tokens")

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: token for token, i in self._vocab.items()}

    # The abstract base resolves these with hasattr() on themselves, which recurses;
    # answer directly instead. A missing special is an AttributeError, which megatron's
    # datasets treat as "not defined".
    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def eos_id(self) -> int:
        return self.eod_id

    @property
    def pad_id(self) -> int:
        if self._pad_id is None:
            raise AttributeError("tokenizer.json has no pad token")
        return self._pad_id

    @property
    def bos_id(self) -> int:
        raise AttributeError("tokenizer.json tokenizers have no bos id here")

    @property
    def unk_id(self) -> int:
        raise AttributeError("tokenizer.json tokenizers have no unk id here")

    @property
    def mask_id(self) -> int:
        raise AttributeError("tokenizer.json tokenizers have no mask id")

    @property
    def cls_id(self) -> int:
        raise AttributeError("tokenizer.json tokenizers have no cls id")

    @property
    def sep_id(self) -> int:
        raise AttributeError("tokenizer.json tokenizers have no sep id")

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return []


class HFTokenizer(MegatronTokenizerText):
    """A Hugging Face ``tokenizer.json`` (e.g. GPT-NeoX-20B's, which Pythia uses).

    EOD is ``eod_token`` when given, else the first of ``EOD_CANDIDATES`` present.
    A model directory holding ``tokenizer.json`` is accepted too.
    """

    FIX = "pass the path of a Hugging Face tokenizer.json (--tokenizer-model)."

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None) -> None:
        candidate = Path(path).expanduser()
        if candidate.is_dir() and (candidate / "tokenizer.json").is_file():
            candidate = candidate / "tokenizer.json"
        resolved = _existing_file(candidate, "Hugging Face tokenizer.json", self.FIX)
        kwargs = {"eod_token": eod_token} if eod_token else {}
        try:
            super().__init__(str(resolved), {"library": "tokenizers"}, **kwargs)
        except _MissingEod as error:
            raise ValueError(
                f"Hugging Face tokenizer.json {resolved} has no end-of-document token "
                f"({error}). Fix: pass eod_token=<its EOD token>."
            ) from error
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(
                f"Hugging Face tokenizer.json {resolved} could not be read ({error}). "
                f"Fix: {self.FIX}"
            ) from error

    def _restore_model(self, **kwargs: Any) -> MegatronTokenizerTextAbstract:
        return _TokenizerJson(self.path, **kwargs)


def build_tokenizer(
    tokenizer_type: str, path: str | os.PathLike, eod_token: str | None = None
) -> MegatronTokenizerText:
    """``tokenizer_type`` is "sentencepiece" or "hf" (a tokenizer.json)."""
    if tokenizer_type == "sentencepiece":
        if eod_token:
            raise ValueError("eod_token applies to hf tokenizers; sentencepiece uses eos")
        return SentencePieceTokenizer(path)
    if tokenizer_type in ("hf", "huggingface"):
        return HFTokenizer(path, eod_token=eod_token)
    raise ValueError(
        f"unknown tokenizer type {tokenizer_type!r}; expected one of {list(TOKENIZER_TYPES)}"
    )
