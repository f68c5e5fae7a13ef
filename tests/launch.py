"""Run a worker script in N local processes with torchrun's environment (gloo on CPU).

Two hazards of a hand-rolled launcher are avoided:
  - pipe deadlock: each rank writes to its own temporary file, not a pipe that nobody reads
    while rank 0 is being waited on (a rank filling a 64 KiB pipe buffer would block forever);
  - free-port race: this process hosts the rendezvous TCPStore itself, bound to port 0 (the
    OS picks a free port and it stays bound for the whole run), and the ranks connect to it as
    clients, as under torchrun's agent (TORCHELASTIC_USE_AGENT_STORE).
A rank that fails stops the others at once instead of leaving them blocked in a collective.

Scripts start through tests/forkserver.py (a fork of an interpreter that has already imported
torch, megatron-core and DeepSpeed: ~10 s less per process) unless MESH_TEST_FORKSERVER=0 or
the machine shows a CUDA device: CUDA does not survive fork, and `import deepspeed` in the
server initialises it (its accelerator probe calls torch.cuda.is_available()), so there every
script is a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_SERVER = None


def cuda_visible() -> bool:
    """Whether torch sees a CUDA device here (asked in this process, which never forks a
    script without exec; the fork server is never started where this is True)."""
    import torch

    return torch.cuda.is_available()


def _forkserver():
    """The session's fork server, started on first use (None when disabled or unavailable)."""
    global _SERVER
    if _SERVER is None and os.environ.get("MESH_TEST_FORKSERVER", "1") != "0" and sys.platform == "linux" \
            and not cuda_visible():
        import atexit

        from forkserver import ForkServer

        _SERVER = ForkServer(dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=_pythonpath()))
        atexit.register(_SERVER.close)
    return _SERVER


def _pythonpath() -> str:
    return os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])


def start_script(script: str, args: list[str], env: dict[str, str], stdout, stderr=None, cwd: str = ROOT):
    """`python script args` with `env`, output to the given files (stderr None: into stdout);
    a subprocess.Popen or a forkserver.ForkedProcess (pid, poll, wait, kill, returncode)."""
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [_pythonpath(), env.get("PYTHONPATH", "")])))
    server = _forkserver()
    if server is not None:
        return server.start([script, *args], env, cwd, stdout, stderr or stdout)
    return subprocess.Popen([sys.executable, script, *args], env=env, cwd=cwd, stdout=stdout,
                            stderr=stderr or subprocess.STDOUT)


def run_script(script: str, args: list[str], env: dict[str, str] | None = None, cwd: str = ROOT,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) of `python script args`, through start_script."""
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = start_script(script, args, dict(env if env is not None else os.environ), out, err, cwd=cwd)
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return subprocess.CompletedProcess([script, *args], proc.returncode, _read(out), _read(err))


def rendezvous_store():
    """A TCPStore server on a port the OS chose; keep the object alive while ranks run."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def run_workers(script: str, nprocs: int, args: list[str], timeout: float = 600,
                env: dict[str, str] | None = None) -> list[str]:
    """Start `nprocs` copies of `script`; fail with every rank's output if any rank fails."""
    store = rendezvous_store()
    logs = [tempfile.TemporaryFile(mode="w+", prefix=f"rank{r}_") for r in range(nprocs)]
    procs = []
    for rank in range(nprocs):
        rank_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                        LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                        TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1", **(env or {}))
        procs.append(start_script(script, args, rank_env, logs[rank]))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                time.sleep(5)  # let the others print their side of the failure
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{script} did not finish within {timeout} s:\n" + _tails(logs, procs))
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = [_read(f) for f in logs]
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise AssertionError("\n".join(f"--- rank {i} (rc {procs[i].returncode}) ---\n{outputs[i][-4000:]}"
                                       for i in failed))
    return outputs


def _read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def _tails(logs, procs) -> str:
    return "\n".join(f"--- rank {i} (rc {p.poll()}) ---\n{_read(f)[-2000:]}" for i, (f, p) in enumerate(zip(logs, procs)))
