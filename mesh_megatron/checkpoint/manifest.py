"""Per-tag manifest: every file of a checkpoint with its size and SHA-256, verified at load.

    SAVE/iter_0000010/manifest.json   {"run_id", "iteration",
                                       "files": {"mp_rank_00_model_states.pt": {"size", "sha256"}, ...}}

Written by rank 0 after every rank's DeepSpeed files and the tokenizer copy are on disk,
before mesh_config.json (the tag's commit record). Sizes are checked wherever a checkpoint is
named (cheap: a truncated file is caught before any process group exists); checksums when a
run resumes, so a torn or bit-rotted file is one clear line instead of an unpickling traceback.

Hashing is shared: at save each rank hashes the files it wrote itself (its ZeRO shard, its
model-parallel rank's model states), all at once, and rank 0 only merges (`hashed=`); at load
each rank checks the checksums of its share of the files (`shares`, by size) and the verdicts
are combined. A multi-GB save then costs one rank's share of hashing, not the whole sum, on
the preemption critical path; the load-time check still covers every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(tag_dir: str, skip: set[str]) -> list[str]:
    """Paths relative to the tag, sorted; the manifest, the commit record and markers excluded."""
    out = []
    for root, _, names in os.walk(tag_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel not in skip:
                out.append(rel)
    return sorted(out)


def hash_files(tag_dir: str, rels: list[str]) -> dict[str, dict]:
    """{rel: {"size", "sha256"}} of these files of the tag (what one rank contributes)."""
    return {rel: {"size": os.path.getsize(os.path.join(tag_dir, rel)), "sha256": sha256_of(os.path.join(tag_dir, rel))}
            for rel in rels}


def build_manifest(tag_dir: str, run_id: str, iteration: int, skip: set[str],
                   hashed: Optional[dict[str, dict]] = None) -> dict:
    """The manifest of every file in the tag; entries of `hashed` (the other ranks' hash_files)
    are taken as they are when the file still has that size, the rest are hashed here."""
    hashed = hashed or {}
    files = {}
    for rel in _files(tag_dir, skip | {MANIFEST}):
        size = os.path.getsize(os.path.join(tag_dir, rel))
        known = hashed.get(rel)
        files[rel] = known if known is not None and known["size"] == size else \
            {"size": size, "sha256": sha256_of(os.path.join(tag_dir, rel))}
    return {"run_id": run_id, "iteration": iteration, "files": files}


def shares(sizes: dict[str, int], ranks: int) -> list[list[str]]:
    """The files split over `ranks` by bytes (largest first, each to the least loaded rank);
    the same split on every rank that reads the same manifest."""
    out: list[list[str]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        i = min(range(ranks), key=lambda j: (load[j], j))
        out[i].append(rel)
        load[i] += sizes[rel]
    return out


def verify_manifest(tag_dir: str, checksums: bool, only: Optional[Iterable[str]] = None,
                    share: Optional[tuple[int, int]] = None) -> Optional[str]:
    """None if every listed file is there with its size (and checksum); else what is wrong.
    `only`: the files (relative to the tag) whose checksums are compared; `share` (rank,
    ranks): of those, only this rank's part (shares). Sizes are always checked for every file."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return f"it has no {MANIFEST} (the save did not finish)"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    summed = set(files) if only is None else set(only)
    unlisted = sorted(summed - set(files)) if checksums else []
    if unlisted:
        return f"its {MANIFEST} does not list {unlisted[0]}"
    if checksums and share is not None:
        summed &= set(shares({rel: want["size"] for rel, want in files.items()}, share[1])[share[0]])
    for rel, want in sorted(files.items()):
        full = os.path.join(tag_dir, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != want["size"]:
            return f"{rel} is {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if checksums and rel in summed and sha256_of(full) != want["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest (corrupt)"
    return None
