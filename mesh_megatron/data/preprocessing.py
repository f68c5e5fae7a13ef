"""Tokenize a jsonl/text file into a megatron-core indexed dataset (PREFIX.bin/.idx).

Writing goes through megatron-core's own ``IndexedDatasetBuilder`` (so the files are
exactly what ``IndexedDataset`` and ``GPTDataset`` read) into temporary names next to the
output; only a finished dataset is renamed into place. A crash, Ctrl-C or a bad input line
therefore never leaves a half-written PREFIX.bin/.idx behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText
from tqdm import tqdm

from mesh_megatron.data.documents import (
    RawDocument,
    check_input_file,
    decode_document,
    input_format,
    read_raw_documents,
)
from mesh_megatron.data.tokenizer import build_tokenizer

# Documents handed to a worker per round trip: large enough to amortise pickling, small
# enough that the progress bar moves and the first bad line surfaces quickly.
IMAP_CHUNKSIZE = 16


@dataclass(frozen=True)
class PreprocessResult:
    prefix: str
    documents: int
    tokens: int
    skipped_empty: int
    seconds: float


@dataclass(frozen=True)
class _EncodeJob:
    """Everything a worker needs; picklable, so spawn/forkserver pools work too."""

    path: str
    fmt: str
    json_key: str
    tokenizer_type: str
    tokenizer_model: str
    append_eod: bool


class StagedPrefix:
    """Temp .bin/.idx names for PREFIX; ``commit()`` renames them into place.

    The .bin is renamed before the .idx, so whoever sees PREFIX.idx also sees the
    complete PREFIX.bin it describes. Leaving the block without commit deletes the temps.
    Temp names are unique per call, so concurrent writers of one prefix never collide.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.bin_path = f"{self.prefix}.bin{tag}"
        self.idx_path = f"{self.prefix}.idx{tag}"
        self._committed = False

    def __enter__(self) -> StagedPrefix:
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        return self

    def commit(self) -> None:
        os.replace(self.bin_path, f"{self.prefix}.bin")
        os.replace(self.idx_path, f"{self.prefix}.idx")
        self._committed = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._committed:
            for path in (self.bin_path, self.idx_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


# One tokenizer per worker process, loaded once by the pool initializer.
_job: _EncodeJob | None = None
_tokenizer: MegatronTokenizerText | None = None


def _init_worker(job: _EncodeJob, tokenizer: MegatronTokenizerText | None = None) -> None:
    global _job, _tokenizer
    _job = job
    _tokenizer = tokenizer or build_tokenizer(job.tokenizer_type, job.tokenizer_model)


def _init_pool_worker(job: _EncodeJob) -> None:
    # Ctrl-C and SIGTERM are the parent's to handle: it stops the pool and removes the
    # temp files. Workers inheriting a Python handler would print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(job)


def _encode(raw: RawDocument) -> tuple[list[int], int]:
    """Token ids of one document ([] when its text is empty) and its input bytes."""
    assert _job is not None and _tokenizer is not None, "worker not initialised"
    text = decode_document(raw, _job.fmt, _job.path, _job.json_key)
    if not text:
        return [], raw.nbytes
    ids = list(_tokenizer.tokenize(text))
    if _job.append_eod:
        ids.append(_tokenizer.eod)
    return ids, raw.nbytes


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver where available: plain fork copies a parent's native threads' locks
    (a training or test process holds gloo and OpenMP threads) and the child can
    deadlock on one. The server imports this module once; workers fork from it."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


@contextmanager
def _encoder(
    job: _EncodeJob, workers: int, tokenizer: MegatronTokenizerText
) -> Iterator[Iterator[tuple[list[int], int]]]:
    """Encoded documents in input order, from a pool when workers > 1.

    A context manager so the pool is forked before any progress-bar thread exists and
    is terminated as soon as the caller fails, not at garbage collection.
    """
    raw = read_raw_documents(Path(job.path), job.fmt)
    if workers <= 1:
        _init_worker(job, tokenizer)
        yield map(_encode, raw)
        return
    with _pool_context().Pool(workers, initializer=_init_pool_worker, initargs=(job,)) as pool:
        # imap (not imap_unordered): the dataset keeps the input's document order.
        yield pool.imap(_encode, raw, chunksize=IMAP_CHUNKSIZE)


def preprocess(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer_type: str,
    tokenizer_model: str | os.PathLike,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    progress: bool = False,
) -> PreprocessResult:
    """Write OUTPUT_PREFIX.bin/.idx from a .jsonl (one document per line, text under
    ``json_key``) or .txt (documents separated by blank lines). Empty documents are
    skipped. Raises FileNotFoundError/ValueError with one clear message on bad input.
    """
    start = time.monotonic()
    path = check_input_file(input_path)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # Load once here too: a bad tokenizer fails before any file is created, and the
    # dtype (uint16 below 65500 ids, else int32) follows its vocab as megatron's does.
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    job = _EncodeJob(
        path=str(path),
        fmt=input_format(path),
        json_key=json_key,
        tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer.path,  # resolved (a directory becomes its tokenizer.json)
        append_eod=append_eod,
    )
    documents = tokens = skipped = 0
    with StagedPrefix(output_prefix) as staged:
        builder = IndexedDatasetBuilder(
            staged.bin_path, dtype=DType.optimal_dtype(tokenizer.vocab_size)
        )
        try:
            with (
                _encoder(job, workers, tokenizer) as encoded,
                tqdm(
                    total=path.stat().st_size,
                    unit="B",
                    unit_scale=True,
                    desc=f"tokenizing {path.name}",
                    disable=not progress,
                ) as bar,
            ):
                for ids, nbytes in encoded:
                    bar.update(nbytes)
                    if not ids:
                        skipped += 1
                        continue
                    # One sequence per document: GPTDataset reads sequences as documents.
                    builder.add_document(ids, [len(ids)])
                    documents += 1
                    tokens += len(ids)
        finally:
            builder.data_file.close()  # finalize() closes it too; this covers errors
        if documents == 0:
            raise ValueError(f"input file {path} holds no non-empty documents")
        builder.finalize(staged.idx_path)
        staged.commit()
    return PreprocessResult(
        prefix=os.fspath(output_prefix),
        documents=documents,
        tokens=tokens,
        skipped_empty=skipped,
        seconds=time.monotonic() - start,
    )


def iter_documents(input_path: str | os.PathLike, json_key: str = "text") -> Iterable[str]:
    """The documents of an input file exactly as ``preprocess`` sees them (empty ones
    included), for checks and tests."""
    path = check_input_file(input_path)
    fmt = input_format(path)
    for raw in read_raw_documents(path, fmt):
        yield decode_document(raw, fmt, str(path), json_key)
