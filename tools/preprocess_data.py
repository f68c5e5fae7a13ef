#!/usr/bin/env python3
"""Tokenize a .jsonl or .txt file into a megatron-core indexed dataset (PREFIX.bin/.idx).

Thin CLI over mesh_megatron.data.preprocessing.preprocess; see --help.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# Runnable from a checkout without installing; an installed package still wins.
sys.path.append(os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

EMBEDDED_TOKENIZER = "mesh_megatron/data/corpus/tokenizer.model"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize a .jsonl or .txt file into a megatron-core indexed dataset "
        "(PREFIX.bin + PREFIX.idx) for training. Output is written to temporary names and "
        "renamed into place only when complete, so a failure never leaves a partial "
        "PREFIX.bin/.idx.",
        epilog="example: tools/preprocess_data.py --input corpus.jsonl --output-prefix "
        f"data/corpus --tokenizer-type sentencepiece --tokenizer-model {EMBEDDED_TOKENIZER} "
        "--workers 4 --append-eod",
    )
    parser.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help="Input file. .jsonl/.json/.ndjson: one JSON object per line, one document "
        "each (text under --json-key; blank lines ignored). .txt/.text: UTF-8 text, "
        "documents separated by blank lines. Empty documents are skipped.",
    )
    parser.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="Output path without extension; writes PREFIX.bin (token ids) and PREFIX.idx "
        "(document index). Missing parent directories are created; existing files at "
        "PREFIX are replaced.",
    )
    parser.add_argument(
        "--tokenizer-type",
        required=True,
        choices=("sentencepiece", "hf"),
        help="'sentencepiece' for a sentencepiece .model file (EOD = its eos piece); "
        "'hf' for a Hugging Face tokenizer.json, e.g. GPT-NeoX-20B's used by Pythia "
        "(EOD = <|endoftext|> when present).",
    )
    parser.add_argument(
        "--tokenizer-model",
        required=True,
        metavar="PATH",
        help="Tokenizer file: the .model (sentencepiece) or tokenizer.json, or a directory "
        f"holding tokenizer.json (hf). The embedded default is {EMBEDDED_TOKENIZER}.",
    )
    parser.add_argument(
        "--json-key",
        default="text",
        metavar="KEY",
        help="Key of the document text in each JSON line (default: text). Ignored for .txt.",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="Tokenizer processes (default: 1). Documents keep their input order.",
    )
    parser.add_argument(
        "--append-eod",
        action="store_true",
        help="Append the tokenizer's end-of-document id to every document, so training "
        "samples that span documents see the boundary. Usual for GPT pretraining.",
    )
    return parser


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM (kill, Slurm time limit) takes the Ctrl-C path, so temp files are removed.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # Imported after parsing so --help and usage errors are instant (megatron is heavy).
    from mesh_megatron.data.preprocessing import preprocess

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = preprocess(
            args.input,
            args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            json_key=args.json_key,
            workers=args.workers,
            append_eod=args.append_eod,
            progress=True,
        )
    except (ValueError, OSError) as error:
        sys.exit(f"preprocess_data.py: error: {error}")
    except KeyboardInterrupt:
        sys.exit("preprocess_data.py: interrupted; no output written")
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may be called in-process
    skipped = f", {result.skipped_empty} empty skipped" if result.skipped_empty else ""
    print(
        f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} "
        f"tokens{skipped} in {result.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
