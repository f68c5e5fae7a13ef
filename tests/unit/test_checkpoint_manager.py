"""CheckpointManager without DeepSpeed: manifests, ownership of tags, cleanup, pruning, save dirs,
and the preemption flag. Saves are simulated: _prepare, one fake DeepSpeed file, _finish."""

import json
import os
import signal

import pytest

from mesh_megatron.checkpoint import manager as cm
from mesh_megatron.checkpoint.manifest import MANIFEST, build_manifest, hash_files, shares, verify_manifest
from mesh_megatron.config import ConfigError, ParallelConfig, preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = preset("tiny", "mesh")


def manager(save, run_id, keep_last=10, overwrite=False, tokenizer=None):
    tok = tokenizer or os.path.join(ROOT, "mesh_megatron/data/corpus/tokenizer.model")
    return cm.CheckpointManager(str(save), keep_last, ParallelConfig(), "sentencepiece", tok,
                                run_id=run_id, overwrite=overwrite)


def fake_save(m, iteration, payload=b"weights"):
    """What CheckpointManager.save does on one rank, with a fake DeepSpeed file."""
    tag = cm.tag_for(iteration)
    assert m._prepare(tag) == "save"
    with open(os.path.join(m.save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(payload * 100)
    m._finish(tag, iteration, MODEL, {})
    return tag


def crashed_save(m, iteration):
    """A save killed after DeepSpeed's files: marker still there, `latest` not moved."""
    tag = cm.tag_for(iteration)
    assert m._prepare(tag) == "save"
    (open(os.path.join(m.save_dir, tag, "mp_rank_00_model_states.pt"), "wb")).write(b"half")
    return tag


def tags(save):
    return sorted(t for t in os.listdir(save) if t.startswith("iter_"))


def test_manifest_catches_truncation_and_corruption(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"x" * 1000)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "t.model").write_bytes(b"tok")
    (tmp_path / MANIFEST).write_text(json.dumps(build_manifest(str(tmp_path), "r1", 3, skip=set())))
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert files.keys() == {"a.pt", "tokenizer/t.model"} and files["a.pt"]["size"] == 1000
    assert verify_manifest(str(tmp_path), checksums=True) is None
    (tmp_path / "a.pt").write_bytes(b"x" * 999 + b"y")  # same size, one byte flipped
    assert verify_manifest(str(tmp_path), checksums=False) is None  # sizes alone cannot see it
    assert verify_manifest(str(tmp_path), checksums=True) == \
        "a.pt does not match its SHA-256 in the manifest (corrupt)"
    (tmp_path / "a.pt").write_bytes(b"x" * 500)
    assert verify_manifest(str(tmp_path), checksums=False) == \
        "a.pt is 500 bytes, the manifest says 1000 (truncated or overwritten)"
    os.remove(tmp_path / "tokenizer" / "t.model")
    (tmp_path / "a.pt").write_bytes(b"x" * 1000)
    assert verify_manifest(str(tmp_path), checksums=False) == "tokenizer/t.model is missing"


def test_manifest_hashing_shared_by_ranks(tmp_path, monkeypatch):
    """Save: rank 0 reuses the other ranks' hashes of their own files (and hashes only what is
    left); load: each rank checksums its share, and the shares together cover every file."""
    sizes = {"mp_rank_00_model_states.pt": 900, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 700,
             "zero_pp_rank_1_mp_rank_00_optim_states.pt": 700, "tokenizer/t.model": 50}
    (tmp_path / "tokenizer").mkdir()
    for rel, size in sizes.items():
        (tmp_path / rel).write_bytes(b"w" * size)
    from mesh_megatron.checkpoint import manifest as mf

    by_rank = [hash_files(str(tmp_path), [r]) for r in ("zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                        "zero_pp_rank_1_mp_rank_00_optim_states.pt")]
    hashed_here = []
    real = mf.sha256_of
    monkeypatch.setattr(mf, "sha256_of", lambda path: hashed_here.append(os.path.basename(path)) or real(path))
    merged = {rel: e for part in by_rank for rel, e in part.items()}
    manifest = build_manifest(str(tmp_path), "r1", 2, skip=set(), hashed=merged)
    assert sorted(hashed_here) == ["mp_rank_00_model_states.pt", "t.model"]  # the shards were not re-hashed
    assert manifest == build_manifest(str(tmp_path), "r1", 2, skip=set())  # same manifest as one rank hashing all
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))

    parts = shares(sizes, 2)
    assert sorted(sum(parts, [])) == sorted(sizes) and [sum(sizes[r] for r in p) for p in parts] == [950, 1400]
    corrupt = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (tmp_path / corrupt).write_bytes(b"w" * 699 + b"x")
    verdicts = [verify_manifest(str(tmp_path), checksums=True, share=(r, 2)) for r in range(2)]
    owner = next(r for r, p in enumerate(parts) if corrupt in p)
    assert verdicts[owner] == f"{corrupt} does not match its SHA-256 in the manifest (corrupt)"
    assert verdicts[1 - owner] is None  # not its share: the other rank's verdict catches it


def test_save_layout_manifest_and_marker_removed(tmp_path):
    m = manager(tmp_path / "ck", "run-a")
    tag = fake_save(m, 2)
    tag_dir = tmp_path / "ck" / tag
    assert (tmp_path / "ck" / "latest").read_text() == tag
    assert not (tag_dir / cm.IN_PROGRESS).exists()
    meta = json.loads((tag_dir / cm.CONFIG_FILE).read_text())
    assert meta["run_id"] == "run-a" and meta["iteration"] == 2
    files = json.loads((tag_dir / MANIFEST).read_text())["files"]
    assert sorted(files) == ["mp_rank_00_model_states.pt", "tokenizer/tokenizer.model"]
    assert cm.read_latest(str(tmp_path / "ck")) == tag
    assert m._prepare(tag) == "skip"  # saving the published iteration again changes nothing


def test_torn_latest_names_the_tag_and_the_previous_loadable_one(tmp_path):
    save = tmp_path / "ck"
    m = manager(save, "run-a")
    fake_save(m, 2)
    fake_save(m, 4)
    with open(save / "iter_0000004" / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ConfigError) as e:
        cm.read_latest(str(save))
    assert str(e.value) == (
        f"--load {save}: 'latest' names 'iter_0000004', but mp_rank_00_model_states.pt is 10 bytes, the "
        f"manifest says 700 (truncated or overwritten); the previous loadable checkpoint is iter_0000002: "
        f"point latest at it (echo iter_0000002 > {save}/latest)")
    (save / "latest").write_text("iter_0000009")  # names a tag with no files
    with pytest.raises(ConfigError, match="'latest' names 'iter_0000009', but that directory does not exist; "
                                          "the previous loadable checkpoint is iter_0000002"):
        cm.read_latest(str(save))
    (save / "latest").write_text("iter_0000002")
    os.remove(save / "iter_0000002" / MANIFEST)
    with pytest.raises(ConfigError, match="has no manifest.json .*no earlier checkpoint in .* is complete: "
                                          "start fresh without --load"):
        cm.read_latest(str(save))


def test_cleanup_removes_only_this_lineage(tmp_path):
    """The issue's bug: a second run into the same --save deleted the first run's checkpoints."""
    save = tmp_path / "ck"
    first = manager(save, "first", keep_last=2)
    fake_save(first, 2)
    crashed_save(first, 3)                               # first run's interrupted save
    other = manager(save, "other", keep_last=1)
    fake_save(other, 1)                                  # (allowed only with --overwrite-save / same dir)
    crashed_save(other, 5)
    assert tags(save) == ["iter_0000001", "iter_0000002", "iter_0000003", "iter_0000005"]
    fake_save(other, 6)
    # `other` removed its own interrupted iter 5 and pruned its iter 1 (keep 1); first's tags stay.
    assert tags(save) == ["iter_0000002", "iter_0000003", "iter_0000006"]
    assert cm.tag_owner(str(save / "iter_0000003")) == "first"
    # A tag of another run at the iteration being saved is never deleted: the save refuses.
    msg = first._prepare("iter_0000006")
    assert msg.startswith(f"--save {save}: iter_0000006 exists and was not written by this run")
    assert tags(save) == ["iter_0000002", "iter_0000006"]  # first cleaned its own iter 3 only


def test_resumed_lineage_replaces_its_abandoned_future_and_prunes(tmp_path):
    save = tmp_path / "ck"
    m = manager(save, "run-a", keep_last=2)
    for it in (2, 4, 6):
        fake_save(m, it)
    assert tags(save) == ["iter_0000004", "iter_0000006"]
    crashed_save(m, 8)
    assert cm.lineage(str(save), str(save)) == "run-a"         # --load DIR --save DIR continues it
    assert cm.lineage(str(save), str(tmp_path / "x")) != "run-a"  # another --load: a new lineage
    (save / "latest").write_text("iter_0000004")  # as after a resume from 4 (e.g. 6 was damaged)
    again = manager(save, cm.lineage(str(save), str(save)), keep_last=2)
    fake_save(again, 5)
    assert tags(save) == ["iter_0000004", "iter_0000005"]  # 6 (abandoned) and 8 (interrupted) gone


def test_overwrite_save_replaces_other_runs_after_the_first_save(tmp_path):
    save = tmp_path / "ck"
    fake_save(manager(save, "old"), 2)
    fake_save(manager(save, "old"), 7)
    new = manager(save, "new", overwrite=True)
    fake_save(new, 2)  # collides with old's iter 2: replaced
    assert tags(save) == ["iter_0000002"] and cm.tag_owner(str(save / "iter_0000002")) == "new"


def test_crash_marker_of_first_save_is_adopted_by_the_same_command(tmp_path):
    save = tmp_path / "ck"
    crashed_save(manager(save, "job"), 5)
    assert cm.lineage(str(save), str(save)) == "job"
    fake_save(manager(save, cm.lineage(str(save), str(save))), 5)
    assert (save / "latest").read_text() == "iter_0000005"


def test_save_dir_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"^--save {tmp_path}/file: is a file, not a directory"):
        cm.check_save_dir(str(tmp_path / "file"), None, False)
    with pytest.raises(ConfigError, match=f"cannot be created, {tmp_path}/file is a file"):
        cm.check_save_dir(str(tmp_path / "file" / "sub"), None, False)
    cm.check_save_dir(str(tmp_path / "new" / "deeper"), None, False)  # creatable: fine, nothing made
    assert not (tmp_path / "new").exists()
    fake_save(manager(tmp_path / "ck", "a"), 2)
    with pytest.raises(ConfigError) as e:
        cm.check_save_dir(str(tmp_path / "ck"), None, False)
    assert str(e.value) == (f"--save {tmp_path}/ck already holds checkpoints (latest iter_0000002) of another "
                            f"run: resume it with --load {tmp_path}/ck, pass another --save directory, or "
                            "--overwrite-save to replace them")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        cm.check_save_dir(str(tmp_path / "ck"), str(tmp_path / "other"), False)
    cm.check_save_dir(str(tmp_path / "ck"), str(tmp_path / "ck"), False)
    cm.check_save_dir(str(tmp_path / "ck"), None, True)


def test_preemption_flag_signal_and_duration(megatron_single):
    from mesh_megatron.training.preemption import Preemption

    before = signal.getsignal(signal.SIGINT)
    p = Preemption().install()
    try:
        assert p.should_stop(1) is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal: recorded once, no KeyboardInterrupt
        assert p.received == signal.SIGTERM and p.should_stop(2) == "signal"
    finally:
        p.uninstall()
    assert signal.getsignal(signal.SIGINT) is before
    assert Preemption(exit_duration_in_mins=0.0).should_stop(1) == "time"
    assert Preemption(exit_duration_in_mins=60.0).should_stop(1) is None


def test_grace_plan_checks_and_cuts():
    """training/grace.py with the issue's numbers: a pythia-1.4b step of 45 s at 128 micro-batches
    under a 30 s grace period (DeepSpeed's launcher)."""
    from mesh_megatron.training.grace import GracePlan

    p = GracePlan(30.0)
    assert p.interval(128) is None  # no step measured yet: nothing to plan with
    p.observe(45.0, 0.0)
    # 45 / 128 = 0.3516 s per micro-batch; one check per 30 / 20 = 1.5 s: every 4 micro-batches.
    assert p.interval(128) == 4
    assert [d for d in range(130) if p.checks_at(d, 128)] == list(range(4, 128, 4))
    p.observe(0.0, 12.0)  # then a 12 s save; the step time stays
    assert (p.step_s, p.save_s) == (45.0, 12.0)
    assert p.rest_s(64, 128) == 22.5 + 12.0
    assert p.cut(1.0, 64, 128)  # 1 + 22.5 + 12 = 35.5 > 30: stop here
    assert not p.cut(1.0, 100, 128)  # 1 + 9.84 + 12 = 22.84 <= 30: the step finishes in time
    assert p.cut(8.2, 100, 128)  # 8.2 + 9.84 + 12 = 30.04 > 30
    assert not p.cut(-1.0, 4, 128)  # no signal
    assert GracePlan(30.0, step_s=10.0, save_s=20.0).interval(128) is None  # 30 s fit: never checked
    assert GracePlan(30.0, step_s=10.0, save_s=20.5).interval(128) == 19  # 1.5 / (10 / 128) = 19.2
    assert GracePlan(30.0, step_s=45.0).interval(1) is None  # one micro-batch: nothing to cut


def test_preemption_cuts_a_long_step_after_a_signal(megatron_single):
    """The collective check at micro-batch boundaries: none planned while a step and a save fit;
    every micro-batch once a 10 s step of 10 (1 s each) and a 0.5 s save exceed a 1 s grace;
    no cut before the signal, a cut at the next boundary after it."""
    from mesh_megatron.training.preemption import Preemption

    p = Preemption(grace_s=1.0).install()
    try:
        assert p.should_stop(1, step_s=0.4, save_s=0.5) is None
        assert p.boundary_check(1, 10) is None  # 0.9 s fit in 1 s: no check, no collective
        assert p.should_stop(1, step_s=10.0, save_s=None) is None
        assert (p.plan.step_s, p.plan.save_s) == (10.0, 0.5)
        check = p.boundary_check(1, 10)
        assert p.plan.interval(10) == 1 and check(1) is False and check(2) is False
        os.kill(os.getpid(), signal.SIGTERM)
        assert check(3) is True
        step, done, accum, age = p.cut_at
        assert (step, done, accum) == (2, 3, 10) and 0 <= age < 5
        assert "during step 2, after micro-batch 3 of 10: the rest of the step (~7.0 s) and a save (~0.5 s) " \
            "would not fit in --preempt-grace-seconds 1; the partial step is discarded, saving iteration 1" \
            in p.describe_cut()
    finally:
        p.uninstall()


def test_exit_duration_counts_from_process_start(megatron_single):
    """A real budget, counted from when the process started (as a scheduler's time limit
    counts imports and setup): 1 minute is up for a process that started 61 s ago and not for
    one that started now; and process_start_time() is this process's start (from /proc), not
    the time of the call: a child that imports torch first reports a start before its import."""
    import subprocess
    import sys
    import time

    from mesh_megatron.training.preemption import Preemption

    assert Preemption(exit_duration_in_mins=1.0, start_time=time.time() - 61).should_stop(1) == "time"
    assert Preemption(exit_duration_in_mins=1.0, start_time=time.time()).should_stop(1) is None
    launched = time.time()
    child = subprocess.run([sys.executable, "-c", "import time, torch\nt = time.time()\n"
                            "from mesh_megatron.training.preemption import process_start_time\n"
                            "print(process_start_time(), t)"], capture_output=True, text=True, timeout=300)
    started, after_import = map(float, child.stdout.split())
    assert launched - 0.05 <= started < after_import  # /proc's start is in clock ticks (10 ms)
