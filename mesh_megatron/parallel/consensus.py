"""Decisions every rank takes together, so that a problem one node sees stops every rank with
the same line instead of leaving the others in a collective until the process-group timeout.

    together(fn)                  every rank runs fn; if any raised, every rank raises the same ConfigError
    visible_from_every_rank(dir)  rank 0 writes a marker in dir; which ranks see it (one bool per rank)

Both are collectives when a process group of more than one rank exists (every rank must call
them at the same point) and plain calls otherwise. The marker answers "is this the same
directory on every node?" with one small file instead of a guess from paths: a relative path
resolved in different working directories, a node-local disk (~, /tmp, /scratch) and a
shared filesystem mounted at different paths all show up as "not seen".
"""

from __future__ import annotations

import os
import sys
import traceback
import uuid
from typing import Callable, Optional, TypeVar

import torch.distributed as dist

from mesh_megatron.config import ConfigError

T = TypeVar("T")
MARKER_PREFIX = ".mesh_megatron_visible-"


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def first_error(error: Optional[str]) -> Optional[str]:
    """Collective: None when no rank has an error, else the first rank's (the same on all ranks),
    saying which ranks hit it when not all did (node-specific problems: a missing local file)."""
    if not _distributed():
        return error
    errors: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [r for r, e in enumerate(errors) if e is not None]
    if not failed:
        return None
    message = errors[failed[0]]
    if len(failed) < len(errors):
        ranks = ", ".join(map(str, failed[:8])) + (", ..." if len(failed) > 8 else "")
        message = f"{message} (on rank{'s' if len(failed) > 1 else ''} {ranks} of {len(errors)})"
    return message


def together(fn: Callable[[], T]) -> T:
    """fn() on every rank; its result, or, if it raised on any rank, the same ConfigError on all.

    ValueError/OSError (ConfigError included) become their message; anything else also prints
    its traceback on the rank that raised it, so no rank is left waiting for one that died.
    Without a process group of several ranks: fn() itself, exceptions unchanged."""
    if not _distributed():
        return fn()
    result, error = None, None
    try:
        result = fn()
    except (ValueError, OSError) as e:
        error = str(e) or type(e).__name__
    except Exception as e:  # noqa: BLE001 -- reported, then raised on every rank below
        traceback.print_exc(file=sys.stderr)
        error = f"{type(e).__name__}: {e}"
    error = first_error(error)
    if error is not None:
        raise ConfigError(error)
    return result  # type: ignore[return-value]


def _missing_parents(directory: str) -> list[str]:
    """The directories makedirs(directory) would create, deepest first."""
    out, path = [], os.path.abspath(directory)
    while not os.path.exists(path):
        out.append(path)
        path = os.path.dirname(path)
    return out


def visible_from_every_rank(directory: str, keep_directory: bool = True) -> list[bool]:
    """Collective: [rank r sees the marker rank 0 just wrote in `directory`] for every rank.

    Rank 0 creates `directory` if needed (keep_directory=False: and removes what it created
    when done, if still empty), writes a uniquely named marker, and removes it once every rank
    has looked. Each rank resolves `directory` itself (its own working directory, its own ~)."""
    if not _distributed():
        return [True]
    name, error, created = None, None, []
    if dist.get_rank() == 0:
        try:
            created = _missing_parents(directory)
            os.makedirs(directory, exist_ok=True)
            name = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
            with open(os.path.join(directory, name), "x") as f:
                f.write(f"written by rank 0 (pid {os.getpid()}) to check that every rank sees this directory\n")
        except OSError as e:
            error = (f"cannot write in {os.path.abspath(directory)} ({type(e).__name__}: {e.strerror or e}): "
                     "pass a directory the run can write to")
    shared = [name, error]
    dist.broadcast_object_list(shared, src=0)
    name, error = shared
    if error:
        raise ConfigError(error)
    seen = [False] * dist.get_world_size()
    dist.all_gather_object(seen, os.path.exists(os.path.join(directory, name)))
    if dist.get_rank() == 0:
        os.remove(os.path.join(directory, name))
        for path in created if not keep_directory else []:
            try:
                os.rmdir(path)  # only if empty: nothing another process put there is touched
            except OSError:
                break
    return seen


def local_rank() -> int:
    """This process's rank on its node (every launcher, and Slurm via adopt_launcher_env, sets it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))
