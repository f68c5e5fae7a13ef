"""Input documents for preprocessing: jsonl (one per line) or text (blank-line separated).

Reading is split in two so the costly half runs in worker processes: the main process
yields ``RawDocument`` records (raw bytes plus the line they came from, so errors can name
it), and ``decode_document`` -- called in the workers -- turns one into text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")


class InputFormatError(ValueError):
    """A bad input line; the message names the file and the line."""


@dataclass(frozen=True)
class RawDocument:
    """One document as read, before decoding; ``nbytes`` drives the progress bar."""

    lineno: int  # 1-based line where the document starts
    payload: bytes
    nbytes: int


def input_format(path: str | os.PathLike) -> str:
    """'jsonl' or 'text', from the file name; any other suffix is an error."""
    name = str(path).lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise ValueError(
        f"cannot tell the format of {path} from its name: use a {'/'.join(JSONL_SUFFIXES)} "
        f"file (one JSON object per line) or a {'/'.join(TEXT_SUFFIXES)} file "
        "(documents separated by blank lines)"
    )


def check_input_file(path: str | os.PathLike) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"input file {resolved} does not exist")
    if not resolved.is_file():
        raise ValueError(f"input {resolved} is not a regular file")
    if not os.access(resolved, os.R_OK):
        raise ValueError(f"input file {resolved} is not readable")
    input_format(resolved)
    return resolved


def read_raw_documents(path: Path, fmt: str) -> Iterator[RawDocument]:
    """Stream ``path`` in binary, so a decoding error can still be pinned to a line."""
    with open(path, "rb") as stream:
        if fmt == "jsonl":
            for lineno, line in enumerate(stream, start=1):
                if line.strip():  # tolerate blank lines (e.g. a trailing one)
                    yield RawDocument(lineno, line, len(line))
            return
        start, lines, nbytes = 0, [], 0
        for lineno, line in enumerate(stream, start=1):
            nbytes += len(line)
            if line.strip():
                if not lines:
                    start = lineno
                lines.append(line)
            elif lines:
                yield RawDocument(start, b"".join(lines), nbytes)
                lines, nbytes = [], 0
        if lines:
            yield RawDocument(start, b"".join(lines), nbytes)


def decode_document(raw: RawDocument, fmt: str, path: str, json_key: str) -> str:
    """The document text; a text document keeps inner newlines, loses the final one."""
    where = f"{path} line {raw.lineno}"
    if fmt == "text":
        try:
            return raw.payload.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            raise InputFormatError(
                f"{where}: the document starting on this line is not valid UTF-8 "
                f"({error.reason} at byte {error.start} of the document)"
            ) from None
    try:
        record = json.loads(raw.payload)
    except UnicodeDecodeError as error:
        raise InputFormatError(f"{where}: not valid UTF-8 ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise InputFormatError(
            f"{where}: bad JSON ({error.msg} at character {error.pos})"
        ) from None
    if not isinstance(record, dict):
        raise InputFormatError(
            f"{where}: a JSON {type(record).__name__}, expected an "
            f'object like {{"{json_key}": "..."}}'
        )
    if json_key not in record:
        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise InputFormatError(
            f"{where}: missing key {json_key!r} (keys: {keys}); pick the key with --json-key"
        )
    text = record[json_key]
    if not isinstance(text, str):
        raise InputFormatError(
            f"{where}: key {json_key!r} is a JSON {type(text).__name__}, expected a string"
        )
    return text
