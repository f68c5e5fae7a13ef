"""Many nodes on one machine: each "node" is a HOME (so its own ~/.cache) and a working
directory of its own, as on a cluster with node-local disks; its ranks share them.

  - srun without a launcher (only SLURM_* and MASTER_* set), 2 nodes x 2 tasks, a --data-path
    dataset (node-local copies), per-node caches: each node's local rank 0 builds its index
    caches while its local rank 1 waits, and the 4 train together as 4 data-parallel ranks;
    preempted by SIGTERM to one rank in the middle of a long accumulated step, every rank cuts
    the step, and they resume from the shared --save to the uninterrupted run's losses and
    grad norms;
  - a node whose cache cannot be written: every rank stops with one line naming the directory;
  - a relative --save from different working directories (node-local): refused at start on
    every rank;
  - two jobs building the same dataset cache at once, after a third was SIGKILLed half-way
    through writing it: no partial file is ever read, both see the same samples.

Every launch has a timeout far below the process-group timeout (--distributed-timeout-minutes 1
where a rank could wait): a hang fails the test instead of stalling the suite.
"""

import importlib.util
import json
import os
import re
import time

import pytest

from launch import ROOT, _read, rendezvous_store, start_script

pytestmark = pytest.mark.distributed
SCRIPT = os.path.join(ROOT, "pretrain_mesh.py")
WORKER = os.path.join(ROOT, "tests", "distributed", "cache_worker.py")
ARGS = ["--ds_config", os.path.join(ROOT, "examples", "zero2.json"), "--train-iters", "2", "--micro-batch-size", "4",
        "--global-batch-size", "8", "--seq-length", "32", "--eval-interval", "0", "--log-interval", "1",
        "--sample-tokens", "0", "--distributed-timeout-minutes", "1"]
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MESH_MEGATRON_CACHE", "XDG_CACHE_HOME", "MESH_MEGATRON_FAULT")


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    return dict(env, OMP_NUM_THREADS="1")


def run_nodes(envs: list[dict], cwds: list[str], args: list[str], timeout: float = 300, name: str = "run",
              script: str = SCRIPT):
    """One `script` (default pretrain_mesh.py) per entry (rank r: envs[r] on top of base_env(), in cwds[r], output
    in cwds[r]/NAME.r.log), meeting at a store hosted here; (return codes, outputs). Never
    waits past `timeout`."""
    store = rendezvous_store()
    common = dict(base_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                  TORCHELASTIC_USE_AGENT_STORE="True")
    logs, procs = [], []
    for env, cwd in zip(envs, cwds):
        logs.append(open(os.path.join(cwd, f"{name}.{len(logs)}.log"), "w+"))
        procs.append(start_script(script, args, dict(common, **env), logs[-1], cwd=cwd))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        assert not hung, f"ranks {hung} still running after {timeout} s:\n" + "\n".join(map(_read, logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [p.returncode for p in procs], [_read(f) for f in logs]


def node_dirs(tmp_path, n=2):
    dirs = []
    for r in range(n):
        (tmp_path / f"node{r}" / "home").mkdir(parents=True)
        dirs.append(tmp_path / f"node{r}")
    return dirs


def slurm(rank: int, ntasks: int = 2, localid: int = 0, nodeid: int | None = None) -> dict[str, str]:
    """What srun gives task `rank` (by default one task per node: each is local rank 0 of its node)."""
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(rank if nodeid is None else nodeid), "SLURM_JOB_ID": "17"}


def make_dataset(tmp_path, nodes) -> str:
    """A --data-path dataset made by tools/preprocess_data.py (its main, in this process), copied to the same relative path
    under every node's working directory (node-local copies of the same files)."""
    import json
    import shutil

    from mesh_megatron.data.embedded import EMBEDDED_CORPUS, EMBEDDED_TOKENIZER_MODEL

    source = tmp_path / "corpus.jsonl"
    with open(EMBEDDED_CORPUS, encoding="utf-8") as docs, open(source, "w", encoding="utf-8") as out:
        for line in list(docs)[:400]:
            out.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(["--input", str(source), "--output-prefix", str(tmp_path / "made" / "corpus"),
              "--tokenizer-type", "sentencepiece", "--tokenizer-model", str(EMBEDDED_TOKENIZER_MODEL), "--append-eod"])
    for d in nodes:
        shutil.copytree(tmp_path / "made", d / "data")
    return str(EMBEDDED_TOKENIZER_MODEL)


def losses_and_norms(path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in open(path)]
    return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in records if "train/grad_norm" in r]


def cache_writers(outs: list[str], under) -> list[int]:
    """The ranks that wrote a cache file under `under` (cache_worker.py --pretrain's observer)."""
    return [r for r, out in enumerate(outs) if f"] cache write {under}" in out]


def test_srun_ranks_per_node_caches_data_path_preemption_and_resume(tmp_path):
    """Only SLURM_* (no RANK/WORLD_SIZE/LOCAL_RANK): 2 "nodes" of 2 srun tasks each (SLURM_PROCID
    0-3, SLURM_LOCALID 0/1, SLURM_NODEID 0/1; a node's two tasks share its HOME and working
    directory), one run of 4 data-parallel ranks on a --data-path dataset made by
    tools/preprocess_data.py, a node-local copy in each node's working directory; each node's
    local rank 0 builds its index caches under its HOME while its local rank 1 waits; --save on
    shared storage; steps of 4 micro-batches per rank (ZeRO-2 reduces at each). Every rank runs
    pretrain_mesh.py's main through cache_worker.py --pretrain, which prints which cache files
    the rank wrote, whether it cut a step, and which megatron-core gloo groups it built (none).

      reference   3 steps uninterrupted, saved at the end; --preempt-grace-seconds 0.001, which
                  no save meets: the save warns (and every micro-batch boundary is checked from
                  step 2 on: no signal, no cut)
      preempted   the same with 0.8 s padded onto each micro-batch but the last (a step of > 2.4 s)
                  under a 1.6 s grace period (the step's last 3/4, > 1.8 s, cannot fit whatever the
                  machine's load); rank 3 alone (local rank 1 of node 1) gets SIGTERM after
                  micro-batch 1 of step 2: all 4 ranks cut step 2 there, discard it, save
                  iteration 1 (each rank hashing the files it wrote) and exit 75 within the 1.6 s
      corrupted   a flipped byte in rank 1's shard: the resume stops with one line on every rank
      resumed     the shard restored, the index caches in a shared --data-cache-dir this time
                  (built by rank 0 alone): steps 2 and 3 with the reference's losses and grad norms
      node-local  --load ckpt, relative: another directory with another `latest` on each node:
      --load      rank 0's tag is missing on node 1, every rank stops with one line
    """
    nodes = node_dirs(tmp_path)
    tokenizer = make_dataset(tmp_path, nodes)
    tasks = [(n, local) for n in range(2) for local in range(2)]  # (SLURM_NODEID, SLURM_LOCALID) of PROCID r
    envs = [dict(slurm(r, ntasks=4, localid=local, nodeid=n), HOME=str(nodes[n] / "home"))
            for r, (n, local) in enumerate(tasks)]
    cwds = [str(nodes[n]) for n, _ in tasks]
    save = tmp_path / "shared_save"
    args = ARGS + ["--train-iters", "3", "--micro-batch-size", "1", "--global-batch-size", "16",
                   "--data-path", "data/corpus", "--tokenizer-type", "sentencepiece", "--tokenizer-model", tokenizer]

    def run(envs, args, name):
        return run_nodes(envs, cwds, ["--pretrain", *args], name=name, script=WORKER)

    rcs, outs = run(envs, args + ["--save", str(tmp_path / "ref_save"), "--log-jsonl", str(tmp_path / "ref.jsonl"),
                                  "--preempt-grace-seconds", "0.001"], "reference")
    assert rcs == [0] * 4, outs
    assert "grad-accum 4 x data-parallel 4" in outs[0], outs[0]  # one run of 4 ranks, not four runs of 1
    for r, out in enumerate(outs):  # nothing uses megatron-core's gloo twins: gloo need not span the nodes
        assert f"[rank {r}] megatron-core gloo groups: none" in out, out
    assert outs[0].count("warning: this save took") == 1 and "more than --preempt-grace-seconds 0.001" in outs[0]
    reference = losses_and_norms(tmp_path / "ref.jsonl")
    assert [step for step, _, _ in reference] == [1, 2, 3]
    for n, d in enumerate(nodes):
        cache = d / "home" / ".cache" / "mesh_megatron"
        assert any((cache / "indices").glob("*shuffle_index.npy")), f"{d.name} did not build its indices"
        assert not list(cache.rglob("*.tmp-*")) and not list(cache.rglob(".mesh_megatron_visible-*"))
        # local rank 0 of the node built it; local rank 1 (same HOME) waited and read it
        assert cache_writers(outs, cache / "indices") == [2 * n], outs

    preempted = [dict(e, MESH_MEGATRON_FAULT="slow_micro_batch:0.8,sigterm_in_step:2.1:3") for e in envs]
    rcs, outs = run(preempted, args + ["--save", str(save), "--log-jsonl", str(tmp_path / "preempted.jsonl"),
                                       "--preempt-grace-seconds", "1.6"], "preempted")
    assert rcs == [75] * 4, outs
    assert [r for r, out in enumerate(outs) if "received SIGTERM" in out] == [3], outs  # one rank signalled
    for r, out in enumerate(outs):  # ... and the cut reached every rank, at the same boundary
        assert f"[rank {r}] cut: " in out and "during step 2, after micro-batch 1 of 4" in out, out
    assert "saving iteration 1" in outs[0], outs[0]
    assert (save / "latest").read_text() == "iter_0000001"  # saved at the cut, not before
    assert outs[0].count("saved checkpoint") == 1, outs[0]
    assert "files hashed by the rank that wrote them: rank 0: 2, rank 1: 1, rank 2: 1, rank 3: 1)" in outs[0], outs[0]
    since = re.search(r"exiting with status 75 at iteration 1, ([0-9.]+) s after the first rank.s signal", outs[0])
    assert since and float(since.group(1)) <= 1.6, outs[0]
    assert "warning: this save took" not in outs[0]
    assert losses_and_norms(tmp_path / "preempted.jsonl") == reference[:1]

    shard = save / "iter_0000001" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # same size: only a checksum sees it
    shard.write_bytes(bytes(data))
    resume = args + ["--save", str(save), "--load", str(save), "--log-jsonl", str(tmp_path / "resumed.jsonl")]
    rcs, outs = run(envs, resume, "corrupted")
    assert rcs == [2] * 4, outs
    for out in outs:
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{shard.name} does not match its SHA-256" in errors[0], out

    shard.write_bytes(good)
    shared_cache = tmp_path / "shared_cache"
    rcs, outs = run(envs, resume + ["--data-cache-dir", str(shared_cache)], "resumed")
    assert rcs == [0] * 4, outs
    assert "resumed from" in outs[0] and "iteration 1," in outs[0], outs[0]
    assert losses_and_norms(tmp_path / "resumed.jsonl") == reference[1:]
    assert len(list(shared_cache.rglob("*shuffle_index.npy"))) == 1  # the shared cache: one copy, complete
    assert not list(shared_cache.rglob("*.tmp-*"))
    assert cache_writers(outs, shared_cache) == [0], outs  # seen by every rank: built once, by rank 0

    # The deadlock: a relative --load that is a different directory on each node, each
    # with its own `latest` (node 0: the reference's iter_0000003, node 1: iter_0000001 only).
    # Rank 0 decides the tag; node 1's ranks cannot see it: every rank stops with one line, no hang.
    import shutil

    shutil.copytree(tmp_path / "ref_save", nodes[0] / "ckpt")
    shutil.copytree(save, nodes[1] / "ckpt", ignore=shutil.ignore_patterns("iter_0000002", "iter_0000003"))
    (nodes[1] / "ckpt" / "latest").write_text("iter_0000001")
    rcs, outs = run(envs, args + ["--load", "ckpt", "--save", str(tmp_path / "new_save")], "node_local_load")
    assert rcs == [2] * 4, outs
    for out in outs:
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "rank 0 resumes from iter_0000003, but at " in errors[0], out
        assert str(nodes[1] / "ckpt" / "iter_0000003") in errors[0] and "must be visible to every node" in errors[0]
        assert "(on ranks 2, 3 of 4)" in errors[0], errors[0]  # node 1's two ranks, not node 0's
        assert "iter " not in out  # stopped before any training


def test_unwritable_cache_on_one_node_stops_every_rank(tmp_path):
    nodes = node_dirs(tmp_path)
    (nodes[1] / "home" / ".cache").write_text("a file where node 1's cache directory should be\n")
    envs = [dict(slurm(r), HOME=str(d / "home")) for r, d in enumerate(nodes)]
    rcs, outs = run_nodes(envs, [str(d) for d in nodes], ARGS + ["--save", str(tmp_path / "shared_save")])
    assert rcs == [2, 2], outs
    for out in outs:
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out
        assert str(nodes[1] / "home" / ".cache") in errors[0] and "--data-cache-dir" in errors[0], errors
        assert "Traceback" not in out, out
    assert not (tmp_path / "shared_save").exists()


def test_node_local_save_refused_at_start_on_every_rank(tmp_path):
    """A relative --save from each node's own working directory: two different directories;
    2 nodes x 2 ranks (torchrun's variables), a node's ranks sharing its HOME and directory."""
    nodes = node_dirs(tmp_path)
    envs = [dict(RANK=str(r), LOCAL_RANK=str(r % 2), WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", GROUP_RANK=str(r // 2),
                 HOME=str(nodes[r // 2] / "home")) for r in range(4)]
    rcs, outs = run_nodes(envs, [str(nodes[r // 2]) for r in range(4)],
                          ARGS + ["--global-batch-size", "16", "--save", "ckpt"])
    assert rcs == [2] * 4, outs
    for out in outs:
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--save must be visible to every node" in errors[0], out
        assert "ranks 2, 3 of 4 do not see" in errors[0], errors  # node 1's ranks; rank 1 shares node 0's
        assert "iter " not in out  # refused before any training
    for d in nodes:  # nothing left behind: rank 0 removed its marker and the directory it made
        assert not (d / "ckpt").exists()
        assert not (d / "home" / ".cache" / "mesh_megatron").exists()  # refused before any cache was built


def test_concurrent_cache_builds_after_a_killed_builder(tmp_path):
    cache = tmp_path / "shared_cache"
    env = dict(base_env(), MESH_MEGATRON_FAULT="kill_torn_index")
    with open(tmp_path / "killed.log", "w+") as out:
        killed = start_script(WORKER, [str(cache)], env, out, cwd=str(tmp_path))
        assert killed.wait(timeout=300) == -9, _read(out)
    # What the killed builder left: a half-written file under a temporary name only.
    torn, final = list(cache.rglob("*shuffle_index.npy.tmp-*")), list(cache.rglob("*shuffle_index.npy"))
    # Two jobs at once on the cache the killed one left; a third on a cache of its own.
    logs = [open(tmp_path / f"job{i}.log", "w+") for i in range(3)]
    jobs = [start_script(WORKER, [str(cache if i < 2 else tmp_path / "own_cache")], base_env(), logs[i],
                         cwd=str(tmp_path)) for i in range(3)]
    try:
        rcs = [j.wait(timeout=300) for j in jobs]
    finally:
        for j in jobs:
            if j.poll() is None:
                j.kill()
    outs = [_read(f) for f in logs]
    assert rcs == [0, 0, 0], outs  # nobody read a partial index
    assert torn and not final, "the builder was not killed mid-write, or left a partial file at its final name"
    digests = [next(line for line in o.splitlines() if line.startswith("samples ")) for o in outs]
    assert digests[0] == digests[1] == digests[2], digests
    assert len(list(cache.rglob("*shuffle_index.npy"))) == 2  # train and valid, each complete
