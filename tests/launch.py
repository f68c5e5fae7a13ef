"""Run a worker script in N local processes with torchrun's environment (gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, nprocs: int, args: list[str], timeout: float = 300) -> list[str]:
    """Start `nprocs` copies of `script`; fail with every rank's output if any rank fails."""
    port = str(free_port())
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise AssertionError("\n".join(f"--- rank {i} (rc {procs[i].returncode}) ---\n{outputs[i][-4000:]}" for i in failed))
    return outputs
