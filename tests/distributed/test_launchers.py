"""The real launchers start the same run as tests/launch.py: `deepspeed --num_gpus 2`, and a
two-node rehearsal on one machine (two torchrun agents of two ranks each, --nnodes 2, meeting
through a c10d rendezvous on localhost), preempted and resumed. Same losses in every case.
(torchrun on one node, `--standalone --nproc_per_node 2`, is the same agent and worker path with
one agent; its own test was folded into the rehearsal for the suite's time.)"""

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from launch import ROOT, run_workers
from test_training import step_losses

pytestmark = pytest.mark.distributed
SCRIPT = os.path.join(ROOT, "pretrain_mesh.py")
BIN = os.path.dirname(sys.executable)
ARGS = ["--ds_config", "examples/zero2.json", "--train-iters", "2", "--micro-batch-size", "4",
        "--global-batch-size", "8", "--seq-length", "32", "--eval-interval", "0", "--log-interval", "1",
        "--sample-tokens", "0"]


def run_args(tmp_path, name):
    return ARGS + ["--save", str(tmp_path / name), "--log-jsonl", str(tmp_path / f"{name}.jsonl")]


def free_port() -> int:
    # The launchers take a port number; a port freed here can be taken by another process
    # before they bind it, so a launch that fails is retried once with a new port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(commands: list[list[str]], timeout: float = 600, envs: list[dict] | None = None,
           cwds: list[str] | None = None, expect_rc: int | None = 0) -> list[str]:
    """Start the launcher processes together (outputs to files: no pipe to fill); all must exit
    `expect_rc` (None: any status, e.g. agents that were preempted; never a hang past `timeout`).
    envs/cwds: per launcher, extra variables and its working directory (default ROOT)."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT)
    logs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
    procs = [subprocess.Popen(c, cwd=(cwds or [ROOT] * len(commands))[i], env=dict(env, **(envs or [{}] * len(commands))[i]),
                              stdout=f, stderr=subprocess.STDOUT, text=True)
             for i, (c, f) in enumerate(zip(commands, logs))]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for f in logs:
        f.seek(0)
        outputs.append(f.read())
    bad = [i for i, p in enumerate(procs) if expect_rc is not None and p.returncode != expect_rc]
    if bad:
        raise AssertionError("\n".join(f"--- launcher {i} (rc {procs[i].returncode}) ---\n{outputs[i][-3000:]}"
                                       for i in bad))
    return outputs


def launch_with_retry(make_commands, **kwargs) -> list[str]:
    try:
        return launch(make_commands(free_port()), **kwargs)
    except AssertionError as e:
        if "address already in use" not in str(e).lower() and "EADDRINUSE" not in str(e):
            raise
        return launch(make_commands(free_port()), **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 2-rank run through tests/launch.py."""
    tmp = tmp_path_factory.mktemp("reference")
    run_workers(SCRIPT, 2, run_args(tmp, "ref"))
    losses = step_losses(tmp / "ref.jsonl")
    assert len(losses) == 2
    return losses


def assert_same(reference, tmp_path, name):
    losses = step_losses(tmp_path / f"{name}.jsonl")
    assert len(losses) == 2
    assert max(abs(a - b) for a, b in zip(reference, losses)) <= 1e-6, (reference, losses)


def test_deepspeed_launcher_two_ranks(reference, tmp_path):
    out = launch_with_retry(lambda port: [[os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port",
                                           str(port), SCRIPT, *run_args(tmp_path, "ds")]])
    assert "data-parallel 2" in out[0]
    assert_same(reference, tmp_path, "ds")


def test_two_node_rehearsal_on_one_machine(reference, tmp_path):
    """Two torchrun agents, two processes each, as two nodes would start them: each "node" with
    its own HOME (its own ~/.cache, where its local rank 0 builds its own dataset caches while
    its local rank 1 waits) and working directory; --save on the shared tmp_path. Four
    data-parallel ranks of micro-batch 1 (2 micro-batches per step) take the reference's global
    batch of 8.

    Preempted as a scheduler preempts a node: during step 2, once micro-batch 1 is done, node 1's
    agent gets SIGTERM (from its rank 2, the fault hook) and forwards it to its two ranks; a
    micro-batch padded to 1 s makes the step too long for --preempt-grace-seconds 1, so all four
    ranks cut step 2 there, save iteration 1 and exit 75, and both agents stop. Resumed by two
    fresh agents: step 2, and the two runs' losses are the uninterrupted reference's."""
    args = [os.path.join(ROOT, a) if a.startswith("examples/") else a for a in ARGS]
    save = tmp_path / "two_nodes"
    common = args + ["--micro-batch-size", "1", "--save", str(save), "--distributed-timeout-minutes", "1"]

    def agents(run_args):
        return lambda port: [[os.path.join(BIN, "torchrun"), "--nnodes", "2", "--node_rank", str(node),
                              "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                              f"127.0.0.1:{port}", "--rdzv-id", "rehearsal", SCRIPT, *run_args] for node in (0, 1)]

    nodes = [tmp_path / f"node{n}" for n in (0, 1)]
    for d in nodes:
        (d / "home").mkdir(parents=True)
    envs = [{"HOME": str(d / "home")} for d in nodes]  # nothing is JIT-built under it (cpu_shims)
    for name in ("MESH_MEGATRON_CACHE", "XDG_CACHE_HOME"):
        for e in envs:
            e[name] = ""
    cwds = [str(d) for d in nodes]
    fault = "slow_micro_batch:1.0,sigterm_launcher_in_step:2.1:2"
    out = launch_with_retry(agents(common + ["--log-jsonl", str(tmp_path / "preempted.jsonl"),
                                             "--preempt-grace-seconds", "1"]),
                            envs=[dict(e, MESH_MEGATRON_FAULT=fault) for e in envs], cwds=cwds, expect_rc=None)
    assert "data-parallel 4" in out[0] and "grad-accum 2" in out[0], out[0]
    assert "[rank 2] received SIGTERM" in out[1] and "[rank 3] received SIGTERM" in out[1], out[1]
    assert "[rank 0] received" not in out[0]  # node 0 was not signalled: it learns of the cut collectively
    assert "during step 2, after micro-batch 1 of 2" in out[0] and "saving iteration 1" in out[0], out[0]
    assert "exiting with status 75 at iteration 1" in out[0], out[0]
    assert (save / "latest").read_text() == "iter_0000001"
    for d in nodes:  # each node built the embedded corpus and its index caches under its own HOME
        assert any((d / "home" / ".cache" / "mesh_megatron" / "embedded").glob("*.idx")), d
        assert any((d / "home" / ".cache" / "mesh_megatron" / "indices").glob("*shuffle_index.npy")), d

    out = launch_with_retry(agents(common + ["--load", str(save), "--log-jsonl", str(tmp_path / "resumed.jsonl")]),
                            envs=envs, cwds=cwds)
    assert "resumed from" in out[0] and "iteration 1," in out[0], out[0]
    losses = step_losses(tmp_path / "preempted.jsonl") + step_losses(tmp_path / "resumed.jsonl")
    assert len(losses) == 2 and max(abs(a - b) for a, b in zip(reference, losses)) <= 1e-6, (reference, losses)
