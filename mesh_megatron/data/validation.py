"""Cheap checks of an indexed dataset (PREFIX.bin/.idx) before any expensive work.

megatron-core's readers assert (or mmap garbage) on a missing or truncated file deep
inside dataset building; these checks read only the .idx header and a couple of numbers
and turn each failure into one ValueError that says what is wrong and how to fix it.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

import numpy
from megatron.core.datasets.indexed_dataset import DType

logger = logging.getLogger(__name__)

# .idx layout written by megatron-core's _IndexWriter: magic, version, dtype code,
# sequence count, document count, then int32 lengths, int64 pointers, int64 doc indices.
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")

REBUILD_HINT = "re-run tools/preprocess_data.py to rebuild it"
DEFAULT_MAX_SCAN_BYTES = 256 * 2**20  # token-id scan budget: a fraction of a second


@dataclass(frozen=True)
class IndexedDatasetInfo:
    prefix: str
    dtype: type[numpy.number]
    sequences: int  # == documents as preprocess_data writes them
    documents: int
    tokens: int


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _missing_files_error(prefix: str, has_bin: bool, has_idx: bool) -> ValueError:
    for ext in (".bin", ".idx"):
        stem = prefix[: -len(ext)]
        if prefix.endswith(ext) and any(os.path.exists(stem + e) for e in (".bin", ".idx")):
            return ValueError(
                f"data prefix {prefix} ends in {ext}: pass the prefix without the extension, "
                f"{prefix[: -len(ext)]}"
            )
    if has_idx:
        return ValueError(
            f"{prefix}.idx exists but {prefix}.bin is missing (.idx without .bin): the token "
            f"file was deleted, moved or never finished; {REBUILD_HINT}"
        )
    if has_bin:
        return ValueError(
            f"{prefix}.bin exists but {prefix}.idx is missing (.bin without .idx); {REBUILD_HINT}"
        )
    hint = (
        " (it looks like a weight: give every path a weight, e.g. 0.7 A 0.3 B)"
        if _looks_like_number(prefix)
        else ""
    )
    return ValueError(
        f"no indexed dataset at prefix {prefix}: neither {prefix}.bin nor {prefix}.idx "
        f"exists{hint}; make one with tools/preprocess_data.py"
    )


def inspect_indexed_dataset(prefix: str | os.PathLike) -> IndexedDatasetInfo:
    """Header facts of PREFIX.idx, after checking both files exist and agree in size."""
    prefix = os.fspath(prefix)
    bin_path, idx_path = f"{prefix}.bin", f"{prefix}.idx"
    has_bin, has_idx = os.path.isfile(bin_path), os.path.isfile(idx_path)
    if not (has_bin and has_idx):
        raise _missing_files_error(prefix, has_bin, has_idx)

    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise ValueError(
            f"{idx_path} is truncated ({idx_size} bytes, no full header); {REBUILD_HINT}"
        )
    magic, version, code, sequences, documents = _HEADER.unpack(head)
    if magic != _INDEX_MAGIC or version != 1:
        raise ValueError(
            f"{idx_path} is not a megatron-core indexed dataset index (bad header); {REBUILD_HINT}"
        )
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise ValueError(
            f"{idx_path} has unknown token dtype code {code}; {REBUILD_HINT}"
        ) from None
    if sequences == 0:
        raise ValueError(f"{prefix} holds no documents; {REBUILD_HINT} from a non-empty input")
    if documents < 2:  # document indices start with 0, so one document needs two entries
        raise ValueError(f"{idx_path} is corrupt ({documents} document indices); {REBUILD_HINT}")

    lengths_at = _HEADER.size
    pointers_at = lengths_at + 4 * sequences
    doc_indices_at = pointers_at + 8 * sequences
    needed = doc_indices_at + 8 * documents
    if idx_size < needed:
        raise ValueError(
            f"{idx_path} is truncated ({idx_size} bytes, its header needs {needed}); {REBUILD_HINT}"
        )
    index = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
    last_length = int(index[pointers_at - 4 : pointers_at].view(numpy.int32)[0])
    last_pointer = int(index[doc_indices_at - 8 : doc_indices_at].view(numpy.int64)[0])
    last_doc_index = int(index[needed - 8 : needed].view(numpy.int64)[0])
    del index
    if last_doc_index != sequences:
        raise ValueError(
            f"{idx_path} is corrupt (document index ends at {last_doc_index}, "
            f"not at its {sequences} sequences); {REBUILD_HINT}"
        )

    itemsize = numpy.dtype(dtype).itemsize
    expected = last_pointer + last_length * itemsize
    actual = os.path.getsize(bin_path)
    if actual != expected:
        state = "truncated" if actual < expected else "larger than its .idx describes"
        raise ValueError(
            f"{bin_path} is {state}: {prefix}.idx describes {expected // itemsize} tokens "
            f"({expected} bytes) but the .bin has {actual} bytes (the .bin and .idx are from "
            f"different or unfinished runs); {REBUILD_HINT}"
        )
    return IndexedDatasetInfo(prefix, dtype, sequences, documents - 1, expected // itemsize)


def sequence_lengths(info: IndexedDatasetInfo) -> numpy.ndarray:
    """Token count of every sequence (document), memory-mapped from the .idx."""
    return numpy.memmap(
        f"{info.prefix}.idx",
        mode="r",
        dtype=numpy.int32,
        offset=_HEADER.size,
        shape=(info.sequences,),
    )


def check_token_ids(
    info: IndexedDatasetInfo,
    padded_vocab: int,
    max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES,
) -> None:
    """Fail if the data holds an id >= ``padded_vocab`` (tokenized with another tokenizer).

    Free when the dtype cannot hold such an id; otherwise a full scan of the .bin, done
    only when it is at most ``max_scan_bytes`` (skipped, with a log line, above that).
    """
    if numpy.iinfo(info.dtype).max < padded_vocab:
        return
    bin_path = f"{info.prefix}.bin"
    size = os.path.getsize(bin_path)
    if size > max_scan_bytes:
        logger.info("skipping the token-id range check of %s (%d bytes)", bin_path, size)
        return
    tokens = numpy.memmap(bin_path, mode="r", dtype=info.dtype)
    chunk = 16 * 2**20
    highest = max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))
    del tokens
    if highest >= padded_vocab:
        raise ValueError(
            f"{bin_path} holds token id {highest} but the model's padded vocab is "
            f"{padded_vocab} (ids must be < {padded_vocab}): the data was tokenized with a "
            "different, larger tokenizer than the one configured"
        )
