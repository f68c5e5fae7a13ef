"""A fork server for the test suite: Python scripts started from an interpreter that has
already imported torch, megatron-core, DeepSpeed and this package.

Why: the distributed tests start ~100 processes of `pretrain_mesh.py` and the tools, and each
fresh interpreter spends ~10 s of one core importing them before it runs a few hundred
milliseconds of training. Here one server process pays the imports once; every script is a
fork of it that then runs exactly as `python SCRIPT ARGS` would:
  - its own environment, working directory, `sys.argv` and `sys.path[0]` (the script's folder);
  - stdout/stderr are the caller's files (passed over the socket as file descriptors);
  - `runpy.run_path(..., run_name="__main__")`, then interpreter-exit semantics: non-daemon
    threads joined, atexit handlers run, streams flushed, the exit status as the script left
    it (SystemExit code, 1 on an uncaught exception, -signal when killed).
Nothing has run a parallel region or started a thread before the fork (checked: the server
refuses to start with more than one OS thread), so the children are as clean as a fresh
interpreter. CUDA is the exception a fork cannot carry: the server is only started where torch
sees no CUDA device (tests/launch.py), and refuses to serve if the imports initialised CUDA. The real launchers (`deepspeed`, `torchrun`) and `tools/ablate.py` are still
tested as fresh interpreters; MESH_TEST_FORKSERVER=0 runs every script that way.

Protocol (AF_UNIX SOCK_SEQPACKET, one connection per child): the client sends one JSON
message {"argv": [script, *args], "env": {...}, "cwd": DIR} with two file descriptors
(stdout, stderr); the server answers {"pid": N} and, when the child exits, {"returncode": R}.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys

PRELOAD = ("torch", "torch.distributed", "deepspeed", "megatron.core", "megatron.core.tensor_parallel",
           "megatron.core.pipeline_parallel", "megatron.core.models.gpt", "megatron.core.datasets.gpt_dataset",
           "megatron.core.optimizer", "mesh_megatron.training.run", "mesh_megatron.training.trainer",
           "mesh_megatron.training.arguments", "mesh_megatron.training.steps", "mesh_megatron.model",
           "mesh_megatron.data.datasets", "mesh_megatron.checkpoint.manager", "mesh_megatron.checkpoint.reshard",
           "mesh_megatron.checkpoint.reader", "mesh_megatron.parallel.initialize")


# ------------------------------------------------------------------ server side
def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fresh_random_state() -> None:
    """A fork inherits the server's generators; give the child what a new interpreter has:
    Python's, numpy's and torch's default generators seeded afresh from the OS."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python SCRIPT ARGS`, never return."""
    code = 1
    try:
        out, err = fds
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (null, out, err):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = os.path.abspath(request["argv"][0])
        sys.argv = list(request["argv"])
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(script)] + extra + [p for p in sys.path[1:] if p not in extra]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _fresh_random_state()
        import runpy

        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            import traceback

            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught error
            import traceback

            traceback.print_exc()
            code = 1
        import atexit
        import threading

        threading._shutdown()  # join non-daemon threads, as interpreter exit does
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream at exit is not our concern
                pass
        if code < 0:  # died of a signal, as the interpreter does for KeyboardInterrupt
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code & 0xFF)


def serve(path: str) -> None:
    parent = os.getppid()
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    if _threads() != 1:  # a fork would copy locks held by threads that do not exist in the child
        raise SystemExit(f"forkserver: {_threads()} threads after the imports; not forking")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child cannot use it
        raise SystemExit("forkserver: the imports initialised CUDA; not forking (run on a machine without "
                         "a visible GPU, or MESH_TEST_FORKSERVER=0)")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the path appears once the server accepts
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready:
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for c in children.values():
                    c.close()
                _run_child(json.loads(message), fds)
            for fd in fds:
                os.close(fd)
            conn.send(json.dumps({"pid": pid}).encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass  # the client went away
                conn.close()


# ------------------------------------------------------------------ client side
class ForkedProcess:
    """The subset of subprocess.Popen the tests use: pid, poll, wait, kill, returncode."""

    def __init__(self, conn: socket.socket, pid: int):
        self._conn, self.pid, self.returncode = conn, pid, None

    def _receive(self, timeout):
        if self.returncode is None and select.select([self._conn], [], [], timeout)[0]:
            data = self._conn.recv(4096)
            self.returncode = json.loads(data)["returncode"] if data else -signal.SIGKILL
            self._conn.close()
        return self.returncode

    def poll(self):
        return self._receive(0)

    def wait(self, timeout=None):
        import subprocess

        if self._receive(timeout) is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        self.send_signal(signal.SIGKILL)


class ForkServer:
    def __init__(self, env: dict[str, str]):
        import subprocess
        import tempfile
        import time

        self._dir = tempfile.mkdtemp(prefix="mesh-forkserver-")
        self.path = os.path.join(self._dir, "socket")
        log = os.path.join(self._dir, "server.log")
        with open(log, "w") as f:
            self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path], env=env,
                                          stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        while not os.path.exists(self.path):
            if self._proc.poll() is not None:
                raise RuntimeError(f"forkserver did not start: {open(log).read()[-2000:]}")
            time.sleep(0.05)

    def start(self, argv: list[str], env: dict[str, str], cwd: str, stdout, stderr) -> ForkedProcess:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.path)
        socket.send_fds(conn, [json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()],
                        [stdout.fileno(), stderr.fileno()])
        return ForkedProcess(conn, json.loads(conn.recv(4096))["pid"])

    def close(self):
        import shutil

        self._proc.kill()
        self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])
