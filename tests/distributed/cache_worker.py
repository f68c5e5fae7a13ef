"""Two test drivers of the cache and rehearsal tests (tests/distributed/test_multinode.py).

    python cache_worker.py CACHE               one "job" building the same datasets as another
                                               into one shared cache: the embedded corpus and
                                               megatron-core's index caches in CACHE; prints
                                               the SHA-256 of the samples it would train on
    python cache_worker.py --pretrain ARGS...  pretrain_mesh.py ARGS, unchanged, with two
                                               observers that print on this rank's stderr:
                                               "[rank R] cache write PATH" for every cache
                                               file it writes (who built which cache: each
                                               node's local rank 0, never a waiting rank), and
                                               "[rank R] cut: ..." when it cuts a step at a
                                               micro-batch boundary (the cut reached it), and
                                               "[rank R] megatron-core gloo groups: ..." once
                                               its groups are built (none: gloo need not reach
                                               across nodes for groups nothing uses)
"""

import hashlib
import os
import sys

from mesh_megatron.data.datasets import build_gpt_datasets
from mesh_megatron.data.embedded import embedded_tokenizer, prepare_embedded_dataset
from mesh_megatron.data.vocab import pad_vocab_size


def samples_digest(cache: str) -> str:
    prefix = prepare_embedded_dataset(cache)
    built = build_gpt_datasets([prefix], "969,30,1", seq_length=32, seed=1234, train_samples=256,
                               valid_samples=16, tokenizer=embedded_tokenizer(), cache_dir=f"{cache}/indices",
                               padded_vocab_size=pad_vocab_size(4096))
    digest = hashlib.sha256()
    for split in (built.train, built.valid):
        for i in range(len(split)):
            digest.update(split[i]["tokens"].numpy().tobytes())
    return digest.hexdigest()


GLOO_GROUPS = ("_DATA_PARALLEL_GROUP_GLOO", "_DATA_PARALLEL_GROUP_WITH_CP_GLOO", "_EXPERT_DATA_PARALLEL_GROUP_GLOO",
               "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO", "_INTRA_PARTIAL_EXPERT_DATA_PARALLEL_GROUP_GLOO")


def observed_pretrain(argv: list[str]) -> int:
    from megatron.core import parallel_state

    from mesh_megatron.data import cache
    from mesh_megatron.parallel import initialize
    from mesh_megatron.training import preemption
    from mesh_megatron.training.run import main

    def rank() -> str:  # RANK: set by the launcher, or from SLURM_PROCID at main()'s start
        return os.environ.get("RANK", "?")

    temporary_name = cache._temporary_name  # every cache writer stages through it

    def observed_name(path: str) -> str:
        print(f"[rank {rank()}] cache write {path}", file=sys.stderr, flush=True)
        return temporary_name(path)

    describe_cut = preemption.Preemption.describe_cut  # every rank calls it on a cut (rank 0 prints it)

    def observed_cut(self) -> str:
        line = describe_cut(self)
        print(f"[rank {rank()}] cut: {line}", file=sys.stderr, flush=True)
        return line

    initialize_distributed = initialize.initialize_distributed

    def observed_initialize(*args, **kwargs):
        out = initialize_distributed(*args, **kwargs)
        built = [name for name in GLOO_GROUPS if getattr(parallel_state, name, None) is not None]
        print(f"[rank {rank()}] megatron-core gloo groups: {', '.join(built) or 'none'}", file=sys.stderr, flush=True)
        return out

    cache._temporary_name = observed_name
    initialize.initialize_distributed = observed_initialize
    preemption.Preemption.describe_cut = observed_cut
    return main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pretrain"]:
        sys.exit(observed_pretrain(sys.argv[2:]))
    print("samples", samples_digest(sys.argv[1]), flush=True)
