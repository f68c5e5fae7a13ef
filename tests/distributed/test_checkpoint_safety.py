"""Checkpoints under failure, through pretrain_mesh.py: SIGKILL at each point of a save, SIGTERM
preemption on one rank of two, the wall-clock budget, a corrupt file, and a reused --save.

One uninterrupted 1-rank reference run (4 steps, saves at 2 and 4) is shared by every test.
"""

import json
import os
import shutil

import pytest
import torch

from torch.distributed import TCPStore

from launch import ROOT, run_script, start_script
from mesh_megatron.checkpoint.manager import IN_PROGRESS, tag_owner, tag_problem

pytestmark = pytest.mark.distributed
SCRIPT = os.path.join(ROOT, "pretrain_mesh.py")
COMMON = ["--ds_config", "examples/zero2.json", "--seq-length", "32", "--eval-interval", "0",
          "--log-interval", "1", "--sample-tokens", "0", "--lr-warmup-fraction", "0.2",
          "--micro-batch-size", "4", "--global-batch-size", "8", "--keep-last", "5"]
EXIT_PREEMPTED = 75


def launch(tmp, name, nprocs, args, fault=None):
    """`nprocs` ranks of pretrain_mesh.py; (return codes, outputs). Outputs go to
    files, not pipes, so a chatty rank never blocks; the rendezvous store is hosted here on a
    port the OS picked (no free-port race), as torchrun's agent does."""
    log = tmp / f"{name}.jsonl"
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1")
    env.pop("MESH_MEGATRON_FAULT", None)
    if fault:
        env["MESH_MEGATRON_FAULT"] = fault
    procs, files = [], []
    for rank in range(nprocs):
        files.append(open(tmp / f"{name}.rank{rank}.out", "w+"))
        procs.append(start_script(SCRIPT, [*COMMON, "--log-jsonl", str(log), *args],
                                  dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), files[-1]))
    try:
        rcs = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = []
    for f in files:
        f.seek(0)
        outs.append(f.read())
        f.close()
    return rcs, outs


def step_losses(path):
    return [r["train/step_loss"] for r in map(json.loads, open(path)) if "train/step_loss" in r]


def params(save, tag):
    states = torch.load(os.path.join(save, tag, "mp_rank_00_model_states.pt"), weights_only=False)
    return {k: v for k, v in states["module"].items() if isinstance(v, torch.Tensor)}


def listing(directory):
    return sorted((os.path.relpath(os.path.join(r, n), directory), os.path.getsize(os.path.join(r, n)))
                  for r, _, names in os.walk(directory) for n in names)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    rcs, outs = launch(tmp, "ref", 1, ["--train-iters", "4", "--save-interval", "2", "--save", str(tmp / "ck")])
    assert rcs == [0], outs[0][-3000:]
    losses = step_losses(tmp / "ref.jsonl")
    assert len(losses) == 4
    return losses, tmp / "ck"


def copy_at(reference_dir, dest, tag):
    """A copy of the reference checkpoints with `latest` on `tag` and nothing newer."""
    shutil.copytree(reference_dir, dest)
    for t in os.listdir(dest):
        if t.startswith("iter_") and t > tag:
            shutil.rmtree(dest / t)
    (dest / "latest").write_text(tag)


CRASH_POINTS = ["kill_torn_model",      # the DeepSpeed files are not complete (model file half written)
                "kill_between_files",   # model file written, optimizer (ZeRO) file not
                "kill_after_files",     # every DeepSpeed file written, no tokenizer or manifest yet
                "kill_torn_tokenizer",  # during the tokenizer copy
                "kill_before_latest"]   # the tag is complete, `latest` not moved


def test_sigkill_at_each_point_of_a_save_then_resume(reference, tmp_path):
    """Each crashed run resumes the previous checkpoint (iteration 2) left by the crash before
    it, trains 3..4 with the reference's exact losses and dies saving iteration 4; a last run
    finishes: its iteration-4 checkpoint equals the reference's bit for bit."""
    ref_losses, ref_save = reference
    save = tmp_path / "ck"
    copy_at(ref_save, save, "iter_0000002")
    run_id = tag_owner(str(save / "iter_0000002"))
    args = ["--train-iters", "4", "--load", str(save), "--save", str(save)]
    for point in CRASH_POINTS:
        rcs, outs = launch(tmp_path, point, 1, args, fault=f"{point}:4")
        assert rcs == [-9], (point, outs[0][-3000:])
        assert "resumed from" in outs[0] and "iteration 2," in outs[0], point
        assert step_losses(tmp_path / f"{point}.jsonl") == ref_losses[2:], point
        assert (save / "latest").read_text() == "iter_0000002", point
        assert tag_problem(str(save), "iter_0000002", checksums=True) is None, point
        left = save / "iter_0000004"
        # What the crash left: an interrupted tag (marker) or, last point, a complete unpublished one.
        assert (left / IN_PROGRESS).exists() == (point != "kill_before_latest"), point
    rcs, outs = launch(tmp_path, "final", 1, args)
    assert rcs == [0], outs[0][-3000:]
    assert step_losses(tmp_path / "final.jsonl") == ref_losses[2:]
    assert (save / "latest").read_text() == "iter_0000004"
    assert tag_problem(str(save), "iter_0000004", checksums=True) is None
    assert tag_owner(str(save / "iter_0000004")) == run_id  # same lineage: --load DIR --save DIR
    got, want = params(save, "iter_0000004"), params(ref_save, "iter_0000004")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_sigterm_on_one_rank_saves_on_every_rank_and_resumes(reference, tmp_path):
    """2 ranks, ZeRO-2: rank 1 alone gets SIGTERM after step 1 and both get one more during the
    save. Both finish step 1, save it (each rank its optimizer shard) and exit 75; the resume
    stops again after step 2 on --exit-duration-in-mins 0.001 (60 ms, counted from process
    start: setup alone takes longer, so the first check stops it). Losses match the 1-rank
    reference."""
    ref_losses, _ = reference
    save = tmp_path / "ck"
    args = ["--train-iters", "4", "--load", str(save), "--save", str(save)]
    rcs, outs = launch(tmp_path, "preempted", 2, args,
                          fault="sigterm_after_step:1:1,sigterm_in_save:1:1,sigterm_in_save:1:0")
    assert rcs == [EXIT_PREEMPTED] * 2, outs
    assert "received SIGTERM again: ignored" in outs[1] and "[rank 1] received SIGTERM" in outs[1]
    assert "stopped by a signal (SIGTERM/SIGINT) after iteration 1: saving" in outs[0]
    assert "exiting with status 75 at iteration 1" in outs[0]
    assert (save / "latest").read_text() == "iter_0000001"
    assert tag_problem(str(save), "iter_0000001", checksums=True) is None
    files = os.listdir(save / "iter_0000001")
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(files)
    rcs, outs = launch(tmp_path, "timed", 2, args + ["--exit-duration-in-mins", "0.001"])
    assert rcs == [EXIT_PREEMPTED] * 2, outs
    assert "stopped: --exit-duration-in-mins reached after iteration 2: saving" in outs[0]
    assert (save / "latest").read_text() == "iter_0000002"
    losses = step_losses(tmp_path / "preempted.jsonl") + step_losses(tmp_path / "timed.jsonl")
    assert len(losses) == 2 and max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5, (losses, ref_losses)


def test_corrupt_file_is_one_line_naming_the_previous_checkpoint(reference, tmp_path):
    """A flipped byte (same size: only the checksum sees it) in the optimizer file of the latest tag."""
    _, ref_save = reference
    save = tmp_path / "ck"
    shutil.copytree(ref_save, save)
    victim = save / "iter_0000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = listing(save)
    proc = run_script(SCRIPT, [*COMMON, "--train-iters", "6", "--load", str(save), "--save", str(save)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --load {save}: checkpoint iter_0000004 is damaged (zero_pp_rank_0_mp_rank_00_"
                      f"optim_states.pt does not match its SHA-256 in the manifest (corrupt)); the previous "
                      f"loadable checkpoint is iter_0000002: point latest at it (echo iter_0000002 > "
                      f"{save}/latest)"]
    assert listing(save) == before  # nothing written, nothing deleted


def test_reused_save_dir_is_refused_and_keeps_the_first_run(reference, tmp_path):
    """The issue's reproduction: after a run, twice `--variant base --train-iters 1` into the same
    --save used to delete its iter_0000002 (then iter_0000004). Now: refused, nothing touched."""
    _, ref_save = reference
    save = tmp_path / "ck"
    shutil.copytree(ref_save, save)
    before = listing(save)
    for _ in range(2):
        proc = run_script(SCRIPT, [*COMMON, "--variant", "base", "--train-iters", "1", "--save", str(save)])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
            f"error: --save {save} already holds checkpoints (latest iter_0000004) of another run: resume it "
            f"with --load {save}, pass another --save directory, or --overwrite-save to replace them"]
        assert listing(save) == before
