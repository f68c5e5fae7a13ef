"""One "job" building the same datasets as another into one shared cache: the embedded corpus
and megatron-core's index caches in CACHE; prints the SHA-256 of the samples it would train on.

    python cache_worker.py CACHE
"""

import hashlib
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


if __name__ == "__main__":
    print("samples", samples_digest(sys.argv[1]), flush=True)
