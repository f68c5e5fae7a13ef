"""Where mesh-megatron keeps rebuildable files (tokenized embedded corpus, dataset
indices, compiled helpers) when the caller names no directory."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MESH_MEGATRON_CACHE"


def default_cache_dir() -> Path:
    """$MESH_MEGATRON_CACHE, else $XDG_CACHE_HOME/mesh_megatron, else ~/.cache/mesh_megatron.

    Multi-node runs should point MESH_MEGATRON_CACHE (or the explicit cache_dir
    arguments) at a filesystem every rank sees: megatron builds dataset indices on
    rank 0 and the other ranks read them after a barrier.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mesh_megatron"
