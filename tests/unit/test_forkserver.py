"""tests/forkserver.py runs a script as `python SCRIPT ARGS` would: argv, environment, working
directory, sys.path[0], separate stdout/stderr, exit status, uncaught errors and signals."""

import os
import signal
import sys
import textwrap

import pytest

from launch import run_script, start_script

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fork server is Linux-only")

SCRIPT = textwrap.dedent("""
    import os, random, sys
    import torch
    if __name__ == "__main__":
        print("argv", sys.argv[1:])
        print("cwd", os.getcwd())
        print("path0", sys.path[0])
        print("env", os.environ.get("FORKSERVER_PROBE"))
        print("torch", torch.rand(1).item(), random.random())
        print("to stderr", file=sys.stderr)
        mode = sys.argv[1]
        if mode == "raise":
            raise ValueError("boom")
        if mode == "kill":
            os.kill(os.getpid(), 9)
        sys.exit(int(mode))
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return str(path)


def test_child_runs_like_a_fresh_interpreter(script, tmp_path):
    env = dict(os.environ, FORKSERVER_PROBE="seen")
    first = run_script(script, ["3", "x y"], env=env, cwd=str(tmp_path))
    assert first.returncode == 3, first.stderr
    lines = dict(line.split(" ", 1) for line in first.stdout.splitlines())
    assert lines["argv"] == "['3', 'x y']"
    assert lines["cwd"] == str(tmp_path) and lines["path0"] == str(tmp_path)
    assert lines["env"] == "seen"
    assert first.stderr.strip().splitlines()[-1] == "to stderr" and "to stderr" not in first.stdout
    # Each child's generators are seeded afresh, as in a new interpreter: no value repeats.
    second = run_script(script, ["0"], env=env, cwd=str(tmp_path))
    t1, r1 = lines["torch"].split()
    t2, r2 = dict(line.split(" ", 1) for line in second.stdout.splitlines())["torch"].split()
    assert second.returncode == 0 and t1 != t2 and r1 != r2


def test_uncaught_error_and_signal_exit_statuses(script, tmp_path):
    raised = run_script(script, ["raise"], cwd=str(tmp_path))
    assert raised.returncode == 1 and "ValueError: boom" in raised.stderr
    killed = run_script(script, ["kill"], cwd=str(tmp_path))
    assert killed.returncode == -signal.SIGKILL


def test_kill_from_the_caller(tmp_path):
    path = tmp_path / "sleeper.py"
    path.write_text("import time\nprint('up', flush=True)\ntime.sleep(600)\n")
    with open(tmp_path / "out", "w+") as out:
        proc = start_script(str(path), [], dict(os.environ), out)
        assert proc.poll() is None
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL


def test_no_fork_server_where_cuda_is_visible(script, tmp_path, monkeypatch):
    """CUDA does not survive fork and the server's `import deepspeed` initialises it: with a
    CUDA device visible, scripts run as fresh interpreters and no server is started."""
    import subprocess

    import forkserver
    import launch
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch, "_SERVER", None)
    monkeypatch.setattr(forkserver, "ForkServer",
                        lambda *args, **kwargs: pytest.fail("a fork server was started with CUDA visible"))
    with open(tmp_path / "out", "w+") as out:
        proc = start_script(script, ["0"], dict(os.environ), out, cwd=str(tmp_path))
        assert isinstance(proc, subprocess.Popen) and proc.wait(timeout=120) == 0
    assert launch._SERVER is None
