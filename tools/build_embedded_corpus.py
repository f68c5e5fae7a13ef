#!/usr/bin/env python3
"""Rebuild the embedded default corpus and its sentencepiece tokenizer.

The corpus is English prose taken from the CPython standard library installed on this
machine (no download): the docstrings of its modules, classes and functions, and the
language-reference topics that pydoc ships in ``pydoc_data/topics.py``. Both are covered
by the PSF License Agreement, which allows redistribution as long as the licence and the
PSF copyright notice travel with the text (``mesh_megatron/data/corpus/LICENSE``).

Output, in ``--output-dir`` (default: ``mesh_megatron/data/corpus``):
  stdlib_docs.jsonl    one document per line, ``{"text": ...}``, shuffled with ``--seed``
  tokenizer.model      sentencepiece BPE, ``--vocab-size`` pieces, byte fallback
  LICENSE              the PSF licence text copied from the stdlib used

The result depends only on the stdlib directory's contents and the flags, so running it
again with the same Python (the committed files were made with CPython 3.11.7) gives the
same corpus. The command that made the committed files:

    .venv/bin/python tools/build_embedded_corpus.py
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "mesh_megatron" / "data" / "corpus"

# Directories whose docstrings are tests, generated tables or legacy duplicates rather
# than documentation prose.
SKIPPED_PARTS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "encodings",
        "turtledemo",
        "__pycache__",
        "lib2to3",
        "distutils",
        "ensurepip",
        "pydoc_data",
        "lib-dynload",
    }
)

MIN_PARAGRAPH_WORDS = 6
MIN_PROSE_RATIO = 0.80  # letters + spaces over all characters of a paragraph
MIN_DOCUMENT_CHARS = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Rebuild the embedded default corpus (stdlib docstrings and pydoc "
        "topics, PSF licence) and train its sentencepiece tokenizer."
    )
    parser.add_argument(
        "--stdlib",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="CPython standard library directory to read (default: this interpreter's).",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="Where stdlib_docs.jsonl, tokenizer.model and LICENSE are written "
        f"(default: {DEFAULT_OUTPUT.relative_to(REPO_ROOT)}).",
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="Seed of the document shuffle (default: 1234)."
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="Number of sentencepiece pieces, specials and 256 byte pieces included "
        "(default: 4096).",
    )
    parser.add_argument(
        "--skip-tokenizer",
        action="store_true",
        help="Only rebuild the jsonl and LICENSE; keep the existing tokenizer.model.",
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- cleaning


def _is_underline(line: str) -> bool:
    """reST-style heading underline ("=====", "*****", "-----")."""
    stripped = line.strip()
    return len(stripped) >= 3 and len(set(stripped)) == 1 and stripped[0] in "=*-~^#"


# Lines that are Python rather than English: compound-statement headers, decorators,
# assignments and bare calls. Prose lines rarely match; code paragraphs mostly do.
_CODE_LINE = re.compile(
    r"^\s*(?:"
    r"(?:async\s+)?(?:def|class|with|for|while|if|elif|else|try|except|finally)\b.*:"
    r"|@\w"
    r"|(?:return|yield|import|from|raise|assert|del|pass|await)\b[^.]*"
    r"|[A-Za-z_][\w.]*(?:\[[^\]]*\])?\s*[-+*/|&]?=\s*\S.*"
    r"|[A-Za-z_][\w.]*\(.*\)"
    r"|[<#{}\[\]()].*"
    r")$"
)
MAX_CODE_LINE_FRACTION = 0.3


def _is_prose(paragraph: str) -> bool:
    """Keep paragraphs that read as sentences; drop code, tables, doctests, grammar."""
    lines = paragraph.splitlines()
    if any(line.lstrip().startswith((">>>", "...", "+-", "|", "$ ")) for line in lines):
        return False
    if sum(bool(_CODE_LINE.match(line)) for line in lines) > MAX_CODE_LINE_FRACTION * len(lines):
        return False
    if "::=" in paragraph:  # grammar productions
        return False
    if len(paragraph.split()) < MIN_PARAGRAPH_WORDS:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
    return letters / len(paragraph) >= MIN_PROSE_RATIO


def clean_text(text: str) -> str:
    """Paragraph-filter ``text`` and normalise its whitespace; '' when nothing is left."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    lines = [line.rstrip() for line in text.split("\n") if not _is_underline(line)]
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    kept = [p.strip("\n") for p in paragraphs if p.strip() and _is_prose(p.strip("\n"))]
    # Dedent each paragraph by its common indent so docstring bodies start at column 0.
    kept = [_dedent(p) for p in kept]
    return "\n\n".join(kept)


def _dedent(paragraph: str) -> str:
    lines = paragraph.split("\n")
    indent = min(len(line) - len(line.lstrip(" ")) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


# ----------------------------------------------------------------------------- sources


def _docstring_groups(tree: ast.Module) -> Iterator[str]:
    """Module docstring; each top-level function; each top-level class with its methods."""
    module_doc = ast.get_docstring(tree)
    if module_doc:
        yield module_doc
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc
        elif isinstance(node, ast.ClassDef):
            parts = [ast.get_docstring(node)]
            parts += [
                ast.get_docstring(child)
                for child in node.body
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            ]
            joined = "\n\n".join(p for p in parts if p)
            if joined:
                yield joined


def stdlib_docstrings(stdlib: Path) -> Iterator[str]:
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in SKIPPED_PARTS or part.startswith("config-") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or use other encodings
        yield from _docstring_groups(tree)


def pydoc_topics(stdlib: Path) -> Iterator[str]:
    """The language-reference topics pydoc ships, one document per top-level section."""
    topics_py = stdlib / "pydoc_data" / "topics.py"
    if not topics_py.is_file():
        return
    # topics.py is a literal dict assignment; read it without importing the module.
    tree = ast.parse(topics_py.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            topics = ast.literal_eval(node.value)
            break
    else:
        return
    for name in sorted(topics):
        # Split at "Title\n=====" headings so long chapters become several documents.
        yield from re.split(r"\n(?=[^\n]+\n=+\n)", topics[name])


def build_documents(stdlib: Path, seed: int) -> list[str]:
    seen: set[str] = set()
    documents: list[str] = []
    for raw in (*stdlib_docstrings(stdlib), *pydoc_topics(stdlib)):
        text = clean_text(raw)
        if len(text) < MIN_DOCUMENT_CHARS or text in seen:
            continue
        seen.add(text)
        documents.append(text)
    # Shuffle so a contiguous train/valid/test split does not cut by module name.
    random.Random(seed).shuffle(documents)
    return documents


# ------------------------------------------------------------------------------ output


def write_jsonl(documents: list[str], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; the corpus is a shipped, readable file
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        for text in documents:
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def train_tokenizer(documents: list[str], model_path: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    # sentencepiece trains on lines, so newlines never reach it; they are byte-fallback
    # tokens unless declared, and "\n" is everywhere in this corpus.
    sentences = [line for doc in documents for line in doc.split("\n") if line.strip()]
    # model_writer (not model_prefix) keeps temp paths out of the saved trainer spec, and
    # one thread keeps the file byte-identical from machine to machine.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        # identity + kept whitespace: detokenize(tokenize(text)) == text exactly.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,  # any UTF-8 text encodes, no <unk>
        character_coverage=0.9995,
        user_defined_symbols=["\n"],
        unk_id=0,
        bos_id=1,
        eos_id=2,  # the end-of-document token
        pad_id=3,
        num_threads=1,
        max_sentence_length=16384,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, model_path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.stdlib / "os.py").is_file():
        sys.exit(f"build_embedded_corpus: error: {args.stdlib} is not a CPython stdlib dir")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    documents = build_documents(args.stdlib, args.seed)
    corpus_path = args.output_dir / "stdlib_docs.jsonl"
    write_jsonl(documents, corpus_path)
    shutil.copyfile(args.stdlib / "LICENSE.txt", args.output_dir / "LICENSE")
    print(
        f"{corpus_path}: {len(documents)} documents, {corpus_path.stat().st_size} bytes, "
        f"sha256 {_sha256(corpus_path)} (Python {sys.version.split()[0]})"
    )

    if not args.skip_tokenizer:
        model_path = args.output_dir / "tokenizer.model"
        train_tokenizer(documents, model_path, args.vocab_size)
        print(f"{model_path}: {model_path.stat().st_size} bytes, sha256 {_sha256(model_path)}")


if __name__ == "__main__":
    main()
