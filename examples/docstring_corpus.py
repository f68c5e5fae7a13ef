#!/usr/bin/env python
"""A larger offline corpus for CPU experiments: the docstrings of installed Python packages.

The embedded corpus (~400K training tokens) is too small for a token-budget sweep past a
few hundred thousand tokens without repeating itself. This collects module, class and
function docstrings (>= --min-chars, exact duplicates dropped) from the .py files under the
given site-packages folders, in sorted path order (deterministic for one environment), as
jsonl for tools/preprocess_data.py. Same domain as the embedded corpus (English technical
prose about Python APIs), so its tokenizer fits. Nothing is shipped: regenerate it.

    python examples/docstring_corpus.py --out /tmp/docs.jsonl \\
        --packages torch transformers numpy scipy sympy pandas
    python tools/preprocess_data.py --input /tmp/docs.jsonl --output-prefix /tmp/docs \\
        --tokenizer-type sentencepiece --tokenizer-model mesh_megatron/data/corpus/tokenizer.model --append-eod
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import sys


def docstrings(path: str, min_chars: int):
    """Module, class and function docstrings of one source file (unparsable files skipped)."""
    try:
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                yield doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output .jsonl (one {'text': ...} per docstring)")
    p.add_argument("--packages", nargs="+", required=True, help="importable package names to read")
    p.add_argument("--min-chars", type=int, default=200, help="shorter docstrings are skipped")
    args = p.parse_args(argv)
    roots = []
    for name in args.packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            print(f"error: --packages {name}: not an installed package; pass names that import", file=sys.stderr)
            return 2
        roots.extend(spec.submodule_search_locations)
    seen, docs, chars = set(), 0, 0
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        for root in roots:
            for d, dirs, files in os.walk(root):
                dirs.sort()
                for name in sorted(files):
                    if not name.endswith(".py"):
                        continue
                    for doc in docstrings(os.path.join(d, name), args.min_chars):
                        key = hashlib.sha1(doc.encode()).digest()
                        if key in seen:
                            continue
                        seen.add(key)
                        f.write(json.dumps({"text": doc}) + "\n")
                        docs, chars = docs + 1, chars + len(doc)
    os.replace(tmp, args.out)
    print(f"{args.out}: {docs:,} docstrings, {chars / 1e6:.1f}M characters from {', '.join(args.packages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
