"""One run at a time per --save directory.

    SAVE/.claim     {"pid", "host", "started", "argv"}   exclusively locked (flock) by the run's rank 0

The rule: a run owns SAVE while its rank 0 holds the kernel lock on SAVE/.claim, from start
(before data, model or engine are built) to exit. The kernel drops the lock when that process
ends, however it ends (exit, exception, SIGKILL, OOM kill), so the successor of a crashed run
takes over at once: there is no stale claim to judge. A run that finds the lock held is
refused with one line naming the holder (the file's contents are only that description). On
exit the owner removes the file while still holding the lock; a taker re-checks that the
file it locked is still the one at SAVE/.claim, so a claim being released is never shared.
Locks on network filesystems are the filesystem's own (NFSv4: yes, across hosts); where the
filesystem has no locks at all, a warning says the claim could not be taken and the run goes on.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

CLAIM = ".claim"


class SaveClaim:
    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self.path = os.path.join(save_dir, CLAIM)
        self._fd: Optional[int] = None
        self._created_dir = False

    def acquire(self) -> Optional[str]:
        """Take the claim: None when it is ours (or locks are unsupported), else the refusal."""
        try:
            if not os.path.isdir(self.save_dir):
                os.makedirs(self.save_dir, exist_ok=True)
                self._created_dir = True
        except OSError as e:
            return f"--save {self.save_dir}: cannot be created ({e.strerror}); pass a directory you can write to"
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                return f"--save {self.save_dir}: cannot write {CLAIM} there ({e.strerror}); pass a directory you can write to"
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(fd)
                os.close(fd)
                return (f"--save {self.save_dir}: claimed by another run ({holder}); wait for it to end, or "
                        "pass another --save directory (the claim ends when that process exits)")
            except OSError as e:  # ENOLCK / EOPNOTSUPP: a filesystem without locks
                os.close(fd)
                print(f"warning: --save {self.save_dir}: file locks are not supported there ({e.strerror}): "
                      "two runs into it are not prevented", file=sys.stderr, flush=True)
                return None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its owner had just removed: take the new one
        self._fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while locked: a taker waiting on this file retries
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created_dir:
            try:
                os.rmdir(self.save_dir)  # only if empty: the run wrote nothing there
            except OSError:
                pass


def _describe(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are still being written"
