import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# The venv's bin first, as under `make train` and the launchers: DeepSpeed JIT-builds its CPU
# comm op with the first `ninja` on PATH, and the venv's (pip) ninja and a system ninja keep
# incompatible build logs, so a suite that alternated between them rebuilt the op (~50 s)
# at every switch.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def megatron_single():
    """megatron-core parallel state for this one process (TP = PP = DP = 1)."""
    from mesh_megatron.config import ParallelConfig
    from mesh_megatron.parallel.initialize import initialize_distributed

    initialize_distributed(ParallelConfig())
    yield


# --- The suite leaves the checkout alone --------------------------------------------------
# Tests write only under their tmp_path. After the session, `git status --porcelain` must be
# what it was, and no file under an ignored directory (checkpoints/ from `make train`, runs/,
# data_cache/, wandb/) may have appeared, changed or vanished. .venv, caches and egg-info are
# the install's own and are skipped.
_SKIP = {".venv", "__pycache__", ".pytest_cache", ".git"}


def _skipped(path: str) -> bool:
    parts = path.rstrip("/").split("/")
    return any(p in _SKIP or p.endswith(".egg-info") for p in parts)


def checkout_snapshot() -> dict[str, tuple]:
    """{'status': porcelain lines, path: (size, mtime_ns)} for every file in ignored paths."""
    import subprocess

    def porcelain(*flags):
        out = subprocess.run(["git", "status", "--porcelain", *flags], cwd=ROOT, capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if not _skipped(line[3:])]

    snap = {"status": tuple(porcelain("--untracked-files=all"))}
    for line in porcelain("--ignored"):
        if not line.startswith("!! "):
            continue
        top = os.path.join(ROOT, line[3:])
        walk = os.walk(top) if os.path.isdir(top) else [(os.path.dirname(top), [], [os.path.basename(top)])]
        for d, dirs, files in walk:
            dirs[:] = [x for x in dirs if not _skipped(x)]
            for f in files:
                full = os.path.join(d, f)
                st = os.stat(full)
                snap[os.path.relpath(full, ROOT)] = (st.st_size, st.st_mtime_ns)
    return snap


def pytest_sessionstart(session):
    if os.path.isdir(os.path.join(ROOT, ".git")):
        session.config._checkout_before = checkout_snapshot()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_checkout_before", None)
    if before is None:
        return
    after = checkout_snapshot()
    changed = sorted({k for k in before.keys() | after.keys() if k != "status" and before.get(k) != after.get(k)})
    status = set(before["status"]) ^ set(after["status"])
    if changed or status:
        lines = [f"  git status: {s}" for s in sorted(status)] + [f"  ignored file changed: {p}" for p in changed[:20]]
        session.config.get_terminal_writer().line(
            "error: the test suite changed the checkout (tests must write under tmp_path):\n" + "\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
