"""The embedded default corpus: shipped text + tokenizer, tokenized once into a cache.

``corpus/stdlib_docs.jsonl`` (CPython stdlib docstrings and pydoc topics, PSF licence,
see corpus/README.md) and ``corpus/tokenizer.model`` (sentencepiece, 4096 pieces, trained
on it) ship inside the package, so a fresh checkout can train with no download.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mesh_megatron.data.cache import default_cache_dir
from mesh_megatron.data.preprocessing import preprocess
from mesh_megatron.data.tokenizer import SentencePieceTokenizer
from mesh_megatron.data.validation import inspect_indexed_dataset

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
EMBEDDED_CORPUS = CORPUS_DIR / "stdlib_docs.jsonl"
EMBEDDED_TOKENIZER_MODEL = CORPUS_DIR / "tokenizer.model"


def embedded_tokenizer() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(EMBEDDED_TOKENIZER_MODEL)


def embedded_prefix(cache_dir: str | os.PathLike | None = None) -> str:
    """Where the tokenized corpus lives; named by the content of corpus + tokenizer, so
    editing either gives a new prefix instead of a stale hit."""
    digest = hashlib.sha256()
    for path in (EMBEDDED_CORPUS, EMBEDDED_TOKENIZER_MODEL):
        digest.update(path.read_bytes())
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return str(root / "embedded" / f"stdlib_docs-{digest.hexdigest()[:16]}")


def prepare_embedded_dataset(cache_dir: str | os.PathLike | None = None) -> str:
    """Tokenize the shipped corpus into ``cache_dir`` (once) and return its data prefix.

    Idempotent: a valid PREFIX.bin/.idx is reused untouched. Safe to race: every writer
    stages to its own temp names and renames finished files into place (.bin before
    .idx), so a crash or a concurrent build never exposes a partial dataset, and the
    builds are byte-identical. Making only rank 0 build is left to the caller.
    """
    prefix = embedded_prefix(cache_dir)
    try:
        inspect_indexed_dataset(prefix)
        return prefix
    except ValueError:
        pass  # missing or damaged: (re)build, replacing whatever is there atomically
    preprocess(
        EMBEDDED_CORPUS,
        prefix,
        tokenizer_type="sentencepiece",
        tokenizer_model=EMBEDDED_TOKENIZER_MODEL,
        append_eod=True,
        workers=1,  # ~0.5 s for the whole corpus; a pool would cost more than it saves
    )
    return prefix
