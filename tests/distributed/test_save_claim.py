"""One run per --save directory (checkpoint/claim.py): the claim is a kernel lock, so a crashed
holder's successor takes over at once, and two runs started together into one new --save
never both train."""

import json
import os
import signal
import tempfile

import pytest

from launch import ROOT, rendezvous_store, start_script
from mesh_megatron.checkpoint.claim import CLAIM, SaveClaim

pytestmark = pytest.mark.distributed


def test_claim_is_exclusive_released_on_exit_and_taken_over_after_a_crash(tmp_path):
    save = str(tmp_path / "new" / "save")
    first, second = SaveClaim(save), SaveClaim(save)
    assert first.acquire() is None
    refusal = second.acquire()
    assert refusal.startswith(f"--save {save}: claimed by another run (pid {os.getpid()} on ")
    assert "\n" not in refusal and "pass another --save directory" in refusal
    first.release()
    assert not os.path.exists(save)  # it created the directory and wrote nothing else: gone
    assert second.acquire() is None  # released: the next run takes it
    second.release()

    # A holder killed with SIGKILL (no cleanup ran; its .claim file stays): the kernel dropped
    # the lock, so the successor takes over without judging staleness.
    pid = os.fork()
    if pid == 0:
        SaveClaim(save).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert json.load(open(os.path.join(save, CLAIM)))["pid"] == pid
    successor = SaveClaim(save)
    assert successor.acquire() is None
    assert json.load(open(os.path.join(save, CLAIM)))["pid"] == os.getpid()
    successor.release()


def test_two_runs_started_together_into_one_new_save_exactly_one_trains(tmp_path):
    save = tmp_path / "save"
    common = ["--ds_config", "examples/zero0.json", "--seq-length", "32", "--eval-interval", "0",
              "--sample-tokens", "0", "--log-interval", "1", "--train-iters", "10", "--save", str(save)]
    procs, outs, errs = [], [], []
    stores = []
    for name in ("a", "b"):
        store = rendezvous_store()
        stores.append(store)
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                   OMP_NUM_THREADS="1")
        out, err = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
        outs.append(out), errs.append(err)
        procs.append(start_script(os.path.join(ROOT, "pretrain_mesh.py"),
                                  common + ["--log-jsonl", str(tmp_path / f"{name}.jsonl")], env, out, err))
    for p in procs:
        p.wait(timeout=600)
    codes = sorted(p.returncode for p in procs)
    texts = []
    for f in errs:
        f.seek(0)
        texts.append(f.read())
    assert codes == [0, 2], (codes, [t[-2000:] for t in texts])
    loser = texts[[p.returncode for p in procs].index(2)]
    errors = [line for line in loser.splitlines() if line.startswith("error:")]
    # Overlapping: refused by the claim; or the winner had finished (and saved) before the loser
    # claimed: refused by the reuse check repeated under the claim. Never both training.
    assert len(errors) == 1 and (f"--save {save}: claimed by another run (pid " in errors[0]
                                 or f"--save {save} already holds checkpoints" in errors[0]), loser[-2000:]
    trained = [name for name in ("a", "b") if (tmp_path / f"{name}.jsonl").exists()
               and "train/step_loss" in (tmp_path / f"{name}.jsonl").read_text()]
    assert len(trained) == 1, trained
    assert (save / "latest").read_text() == "iter_0000010" and not (save / CLAIM).exists()
