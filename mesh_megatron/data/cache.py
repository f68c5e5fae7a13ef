"""Where mesh-megatron keeps rebuildable files (tokenized embedded corpus, dataset
indices, compiled helpers) when the caller names no directory."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from mesh_megatron.config import ConfigError

CACHE_ENV = "MESH_MEGATRON_CACHE"
T = TypeVar("T")


def default_cache_dir() -> Path:
    """$MESH_MEGATRON_CACHE, else $XDG_CACHE_HOME/mesh_megatron, else ~/.cache/mesh_megatron.

    Node-local (the usual ~) and shared storage both work for multi-node runs: the cache
    is built once per filesystem that holds it (build_in_turn), never read half-written.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mesh_megatron"


def build_in_turn(directory: str | os.PathLike, build: Callable[[], T], what: str) -> T:
    """`build()` on every rank, the cache's builders first: once per filesystem that holds
    `directory`. Collective when distributed; a plain call otherwise.

    Builders are rank 0 and the local rank 0 of every node that does not see `directory` as
    rank 0 does (consensus.visible_from_every_rank: node-local ~/.cache, /tmp, ...). The other
    ranks build after them and so find the cache ready (a rank that still misses it builds
    its own copy: every cache writer stages to a temporary name and renames it into place, so
    concurrent builders, other jobs included, never expose a partial file). A failure on any
    rank stops every rank with one line naming `directory`."""
    import torch.distributed as dist

    from mesh_megatron.parallel.consensus import local_rank, together, visible_from_every_rank

    def attempt() -> T:
        try:
            return build()
        except OSError as e:
            raise ConfigError(
                f"cannot build the {what} in {os.path.abspath(directory)} ({type(e).__name__}: "
                f"{e.strerror or e}{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}): pass "
                f"--data-cache-dir (or set {CACHE_ENV}) to a directory every rank can write; node-local "
                "disks work (each node builds its own copy), shared storage is built once") from None

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return attempt()
    seen = together(lambda: visible_from_every_rank(os.fspath(directory)))
    first = dist.get_rank() == 0 or (local_rank() == 0 and not seen[dist.get_rank()])
    result = None
    for builders_turn in (True, False):
        mine = first == builders_turn
        out = together(attempt if mine else lambda: None)
        if mine:
            result = out
    return result  # type: ignore[return-value]


class _AtomicText:
    """open(path, "w"/"wt") for megatron's description.txt: written to a temporary name in the
    same directory and renamed into place on a clean close."""

    def __init__(self, path: str, mode: str):
        self.path, self.tmp = path, _temporary_name(path)
        self.file = open(self.tmp, mode)

    def __enter__(self):
        return self.file

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.file.flush()
            os.fsync(self.file.fileno())
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)


def _temporary_name(path: str) -> str:
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def _torn_write_fault(path: str) -> bool:
    """Test hook (MESH_MEGATRON_FAULT contains kill_torn_index): SIGKILL half-way through writing
    the last index file megatron writes for a dataset (its shuffle index)."""
    return "kill_torn_index" in os.environ.get("MESH_MEGATRON_FAULT", "") and path.endswith("shuffle_index.npy")


@contextmanager
def atomic_index_writes() -> Iterator[None]:
    """Within this context megatron-core's dataset index files land atomically.

    megatron-core 0.16.1 writes `<hash>-description.txt` and then the `.npy` indices (document,
    sample, shuffle; or dataset, dataset-sample for a blend) straight to their final names, and
    treats "all files exist" as a cache hit. A reader (another rank, another job on the same
    data) could map a half-written file, and a builder killed mid-write left one behind that
    the next run read as a hit. Here every such file is written to a temporary name in the same
    directory, fsynced and renamed into place: a name exists only with its whole content, and
    the last file of a set appears after the others are complete. Two builders of the same
    set write identical bytes (same config hash, same seed), so whichever rename wins is right."""
    import numpy
    from megatron.core.datasets import blended_dataset, gpt_dataset

    real_save = numpy.save

    def save(file, arr, allow_pickle=True, **kwargs):
        if not isinstance(file, (str, os.PathLike)):
            return real_save(file, arr, allow_pickle=allow_pickle, **kwargs)
        path = os.fspath(file)
        path = path if path.endswith(".npy") else path + ".npy"  # numpy.save's own rule
        tmp = _temporary_name(path)
        with open(tmp, "wb") as f:
            if _torn_write_fault(path):
                import io
                import signal

                buffer = io.BytesIO()
                real_save(buffer, arr, allow_pickle=allow_pickle, **kwargs)
                f.write(buffer.getvalue()[:buffer.tell() // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(f, arr, allow_pickle=allow_pickle, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def open_(file, mode="r", *args, **kwargs):
        if "w" in mode and not args and not kwargs:
            return _AtomicText(os.fspath(file), mode)
        return open(file, mode, *args, **kwargs)

    numpy.save = save
    gpt_dataset.open = blended_dataset.open = open_  # module globals shadow the builtin there only
    try:
        yield
    finally:
        numpy.save = real_save
        del gpt_dataset.open, blended_dataset.open
