"""The input/output contract of every command (pretrain_mesh.py and tools/*.py).

    before any expensive work    check_output_dir / check_output_file   where results will go
                                 check_input_dir / check_input_file     what will be read
                                 check_json_file, check_safetensors_file, check_torch_file,
                                 check_hf_dir                           cheap structural checks
    while writing                atomic_dir / atomic_file               a temporary sibling
                                                                        (OUT.partial-PID), renamed
                                                                        onto OUT once complete

Every failure is a ConfigError of one line, `FLAG PATH: problem; fix`; a command prints it as
`error: ...` and exits with EXIT_BAD_INPUT (`fail`). A failed write (disk full, read-only
disk, an exception) removes the temporary sibling and leaves OUT as it was: the old output
(--force replaces it only after the new one is complete) or nothing. SIGKILL cannot be
caught: it leaves OUT untouched and OUT.partial-PID beside it, which the user deletes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import struct
import sys
import zipfile
from typing import Any, Iterator, Optional

from mesh_megatron.config import ConfigError

EXIT_BAD_INPUT = 2
PARTIAL = ".partial-"  # OUT.partial-PID: the output being written


def fail(message: Any) -> int:
    """Print the one `error:` line of a refused command; its exit status."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def _nearest_existing(path: str) -> str:
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    return existing


def _check_creatable(path: str, flag: str, kind: str) -> str:
    """The nearest existing ancestor of `path`, which must be a writable directory."""
    existing = _nearest_existing(os.path.dirname(os.path.abspath(path)) or "/")
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path}: cannot be created, {existing} is a file; pass another {kind} path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: not writable ({existing} denies write access); pass a {kind} "
                          "path you can write to")
    return existing


def check_output_dir(path: str, flag: str, *, force: bool = False, existing_ok: bool = False,
                     in_place: bool = False) -> None:
    """`path` can receive a directory: not a file, not under a file, writable; and, unless
    `existing_ok` or `force`, new or empty. `in_place`: the command writes inside `path`
    (pretrain_mesh.py --save) instead of beside it (atomic_dir), so `path` itself must be
    writable when it exists."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a file, not a directory; pass a directory path")
    if os.path.isdir(path):
        target = path if in_place else (os.path.dirname(os.path.abspath(path)) or "/")
        if not os.access(target, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: not writable ({target} denies write access); pass a "
                              "directory you can write to")
        if not existing_ok and not force and os.listdir(path):
            raise ConfigError(f"{flag} {path}: is not empty; pass an empty or new directory, or --force to "
                              "replace it (the old contents go only once the new output is complete)")
        return
    _check_creatable(path, flag, "directory")


def check_output_file(path: str, flag: str, *, force: bool = False) -> None:
    """`path` can receive a file: not a directory, not under a file, its directory writable;
    an existing file only with `force` (it is replaced once the new one is complete)."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory, not a file; pass a file path")
    if os.path.lexists(path):
        if not force:
            raise ConfigError(f"{flag} {path}: exists; pass a new file path, or --force to replace it "
                              "(once the new one is complete)")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: not writable ({parent} denies write access); pass a file "
                              "path you can write to")
        return
    _check_creatable(path, flag, "file")


def check_separate(out: str, source: str, flag: str) -> None:
    """Refuse an output that is, holds or sits inside the source: --force would replace
    what is being read."""
    a, b = os.path.realpath(out), os.path.realpath(source)
    if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
        raise ConfigError(f"{flag} {out}: overlaps the source {source}; write to a separate directory")


# ------------------------------------------------------------------ inputs
def check_input_dir(path: str, flag: str, fix: str) -> None:
    if not os.path.lexists(path):
        raise ConfigError(f"{flag} {path}: does not exist; {fix}")
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a file, not a directory; {fix}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: is not readable (permission denied); make it readable or {fix}")


def check_input_file(path: str, flag: str, fix: str) -> None:
    if not os.path.lexists(path):
        raise ConfigError(f"{flag} {path}: does not exist; {fix}")
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory, not a file; {fix}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot be read ({e.strerror}); {fix}") from None


def check_json_file(path: str, flag: str, fix: str) -> Any:
    """The parsed JSON of `path`, or one line saying why not."""
    check_input_file(path, flag, fix)
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ConfigError(f"{flag} {path}: is not valid JSON ({str(e).splitlines()[0]}: truncated or "
                          f"edited?); {fix}") from None


def check_safetensors_file(path: str, flag: str, fix: str) -> None:
    """Header readable and the file exactly as long as the header's last tensor ends: a
    truncated or foreign file is caught without reading the tensors."""
    check_input_file(path, flag, fix)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{flag} {path}: is not a readable safetensors file ({type(e).__name__}); "
                          f"{fix}") from None
    if 8 + n + end != size:
        raise ConfigError(f"{flag} {path}: is {size} bytes but its safetensors header describes {8 + n + end} "
                          f"(truncated or overwritten); {fix}")


def check_torch_file(path: str, flag: str, fix: str) -> None:
    """torch.save's zip archive has its directory at the end: a truncated file has none."""
    check_input_file(path, flag, fix)
    with open(path, "rb") as f:
        if f.read(2) == b"\x80\x02" and not zipfile.is_zipfile(path):
            return  # torch's legacy (pre-1.6) pickle format: no directory to check
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(f"{flag} {path}: is truncated or not a torch.save file ({type(e).__name__}); "
                          f"{fix}") from None


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


def check_hf_dir(path: str, flag: str, fix: str) -> dict:
    """A Hugging Face model directory: config.json parses and every weights file is whole
    (structure and sizes, not checksums: an export carries none). Returns config.json."""
    check_input_dir(path, flag, fix)
    config_path = os.path.join(path, "config.json")
    if not os.path.lexists(config_path):
        raise ConfigError(f"{flag} {path}: holds no config.json; {fix}")
    config = check_json_file(config_path, flag, fix)
    if not isinstance(config, dict):
        raise ConfigError(f"{flag} {config_path}: is not a JSON object; {fix}")
    present = [name for name in HF_WEIGHTS if os.path.lexists(os.path.join(path, name))]
    if not present:
        raise ConfigError(f"{flag} {path}: holds no weights ({', '.join(HF_WEIGHTS)}); {fix}")
    name = present[0]
    if name == "model.safetensors":
        check_safetensors_file(os.path.join(path, name), flag, fix)
    elif name == "pytorch_model.bin":
        check_torch_file(os.path.join(path, name), flag, fix)
    else:
        index = check_json_file(os.path.join(path, name), flag, fix)
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise ConfigError(f"{flag} {os.path.join(path, name)}: lists no weight files; {fix}")
        check = check_safetensors_file if name.startswith("model.safetensors") else check_torch_file
        for shard in shards:
            check(os.path.join(path, shard), flag, fix)
    return config


# ------------------------------------------------------------------ atomic outputs
def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish_dir(tmp: str, path: str) -> None:
    """`tmp` (complete) becomes `path`; an old `path` is removed only after that."""
    if os.path.isdir(path) and os.listdir(path):
        if _exchange(tmp, path):  # tmp now holds the old output
            shutil.rmtree(tmp)
            return
        old = f"{path}.old-{os.getpid()}"  # no atomic swap here: the old one stays until the new is in place
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
        return
    os.replace(tmp, path)  # onto nothing, or onto an empty directory


def _write_error(flag: str, path: str, error: OSError) -> ConfigError:
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only"}.get(error.errno, error.strerror or type(error).__name__)
    return ConfigError(f"{flag} {path}: writing failed ({what}); nothing was replaced there: free space or "
                       "pass another path")


@contextlib.contextmanager
def atomic_dir(path: str, flag: str) -> Iterator[str]:
    """Yield a new temporary sibling directory to write the output into; on success it is
    renamed onto `path` (replacing an old output only then), on any failure removed."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, os.path.basename(os.path.abspath(path)) + f"{PARTIAL}{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp)
    except OSError as e:
        raise _write_error(flag, path, e) from None
    try:
        yield tmp
        _publish_dir(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(flag, path, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str, flag: str) -> Iterator[str]:
    """Yield a temporary sibling file path; renamed onto `path` when the block completes."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, os.path.basename(path) + f"{PARTIAL}{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise _write_error(flag, path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str, flag: str) -> None:
    """`text` into `path`, whole or not at all."""
    with atomic_file(path, flag) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


