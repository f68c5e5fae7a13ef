"""Train/valid/test GPT datasets from indexed-dataset prefixes, via megatron-core.

``build_gpt_datasets`` is megatron-core's own ``BlendedMegatronDatasetBuilder`` +
``GPTDatasetConfig`` + ``GPTDataset`` (samples are dicts of ``tokens``/``labels``/
``loss_mask``/``position_ids``, each ``[seq_length]``), with checks in front of it that
turn megatron's failure modes into one clear error each, and two workarounds:

* megatron-core 0.16.1 hangs forever (``GPTDataset._get_num_epochs``) when a split that
  is asked for samples gets no documents, e.g. "969,30,1" over a few hundred documents
  gives the test split none. We raise instead, and leave out (return None for) any split
  asked for 0 samples, which megatron would otherwise build as a full epoch.
* ``BlendedDataset`` calls ``torch.distributed.get_rank()`` on a cache miss, which raises
  when no process group exists. Single-process callers get a throwaway one-rank gloo
  group for the duration of the build.

Index caches on many nodes: megatron-core builds a missing cache on global rank 0 only and
every other rank then ``numpy.load``s it, so a node whose cache directory is not rank 0's
(node-local ~/.cache) fails. Here, under a process group, each rank runs megatron's builder
as a lone process would (it builds on a miss), the cache's builders first: one per filesystem
holding the cache (data/cache.py build_in_turn); the index files land atomically
(data/cache.py atomic_index_writes), so concurrent builders never expose a partial file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split, get_blend_from_list
from megatron.core.tokenizers import MegatronTokenizerBase

from mesh_megatron.data.cache import atomic_index_writes, build_in_turn, default_cache_dir
from mesh_megatron.data.cpp_helpers import ensure_helpers_cpp
from mesh_megatron.data.validation import (
    IndexedDatasetInfo,
    check_token_ids,
    inspect_indexed_dataset,
    sequence_lengths,
)
from mesh_megatron.data.vocab import check_vocab_fits


class GPTDatasets(NamedTuple):
    """One dataset per split; None for a split that is not built."""

    train: torch.utils.data.Dataset | None
    valid: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None


def parse_blend(data_path: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron-style blend: ["0.7", "a", "0.3", "b"] (weights) or ["a", "b"] (paths).

    A single string is split on whitespace, as ``--data-path`` would be.
    """
    items = data_path.split() if isinstance(data_path, str) else [os.fspath(p) for p in data_path]
    if not items:
        raise ValueError("no data path given")
    try:
        prefixes, weights = get_blend_from_list(items)
    except AssertionError:  # megatron's own "weights and paths mixed" check
        raise ValueError(
            f"cannot read data path {items}: give either only prefixes or a weight before "
            "every prefix (e.g. 0.7 A 0.3 B)"
        ) from None
    if weights is not None:
        bad = [w for w in weights if not (numpy.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"blend weights must be positive numbers, got {weights}")
    return prefixes, weights


def _split_matrix(split: str) -> list[tuple[float, float] | None]:
    """megatron's split matrix, after checking the string (megatron's parser reads "-1" as
    1 and "abc" or "0,0,0" as NaN shares)."""
    try:
        shares = [float(part) for part in re.split(r"[,/]", split)]
    except ValueError:
        shares = []
    if not (1 <= len(shares) <= 3 and all(0 <= s < math.inf for s in shares) and sum(shares)):
        raise ValueError(
            f"bad split {split!r}: expected one to three non-negative shares for "
            "train,valid,test, not all zero, such as '969,30,1'"
        )
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def _check_splits_have_documents(
    infos: list[IndexedDatasetInfo],
    matrix: list[tuple[float, float] | None],
    sizes: list[int],
    split: str,
) -> None:
    """Raise where megatron would hang: a split asked for samples but given no tokens.

    A valid/test share of 0 is a choice (that split is None); a train share of 0 is not.
    """
    if matrix[Split.train.value] is None:
        raise ValueError(f"split {split!r} gives the train split no share of the documents")
    for info in infos:
        lengths = None
        for kind, bookends, size in zip(Split, matrix, sizes, strict=True):
            if bookends is None or size == 0:
                continue
            # Same document ranges as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
            begin = int(round(bookends[0] * float(info.sequences)))
            end = int(round(bookends[1] * float(info.sequences)))
            if end > begin:
                if lengths is None:
                    lengths = sequence_lengths(info)
                if int(lengths[begin:end].sum(dtype=numpy.int64)) > 0:
                    continue
            raise ValueError(
                f"the {kind.name} split of {info.prefix} gets no tokens: split {split!r} gives "
                f"it documents [{begin}, {end}) of {info.sequences}, but {size} {kind.name} "
                f"samples were requested. Fix: use more documents, a larger {kind.name} "
                f"share in the split, or request 0 {kind.name} samples"
            )


@contextmanager
def _process_group_for_megatron() -> Iterator[None]:
    """A one-rank gloo group when none exists (see the module docstring)."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@contextmanager
def _as_lone_process() -> Iterator[None]:
    """megatron-core's dataset code as a lone process sees it: no process group, rank 0. Its
    builder then builds whatever its cache lacks instead of waiting for global rank 0, and
    runs no collective (the caller orders the ranks: build_in_turn)."""
    dist = torch.distributed
    real = dist.is_initialized, dist.get_rank
    dist.is_initialized, dist.get_rank = (lambda: False), (lambda group=None: 0)
    try:
        yield
    finally:
        dist.is_initialized, dist.get_rank = real


def build_gpt_datasets(
    data_path: str | Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    tokenizer: MegatronTokenizerBase,
    cache_dir: str | os.PathLike | None = None,
    test_samples: int = 0,
    padded_vocab_size: int | None = None,
    is_built_on_rank: Callable[[], bool] = lambda: True,
    create_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
) -> GPTDatasets:
    """Build the train/valid/test ``GPTDataset`` (or ``BlendedDataset``) splits.

    Args:
        data_path: prefixes, optionally weighted: ["0.7", "a", "0.3", "b"] or ["a", "b"].
            Unweighted prefixes are weighted by their token counts (as megatron would)
            but still sized to the requested samples (megatron would stop at one epoch).
        split: "train,valid,test" document shares, e.g. "969,30,1".
        seq_length: tokens per sample; ``tokens``/``labels`` are each this long.
        seed: seeds document and sample shuffling; same seed, same samples.
        train_samples / valid_samples / test_samples: samples per split (at least that
            many; megatron rounds up to whole epochs or blend parts). A split asked for 0
            samples, or given a 0 share by ``split``, is not built (None).
        tokenizer: a mesh_megatron.data.tokenizer tokenizer (eod, vocab_size, ...).
        cache_dir: where megatron caches the index .npy files; default
            ``default_cache_dir()/"indices"``. Node-local or shared: it is built once per
            filesystem that holds it.
        padded_vocab_size: the model's embedding rows; when given, the tokenizer's vocab
            and (when cheap) the data's largest id are checked against it.
        is_built_on_rank: megatron's hook; return False on ranks that need no data.
    Must be called on every rank when torch.distributed is initialised (the cache's
    builders first, see the module docstring); bad input or an unwritable cache on any rank
    raises the same ConfigError on every rank.
    """
    from mesh_megatron.parallel.consensus import together

    # Every rank checks the same inputs; a file one node lacks stops every rank (together).
    config, sizes = together(lambda: _checked_config(
        data_path, split, seq_length, seed, train_samples, valid_samples, tokenizer, cache_dir,
        test_samples, padded_vocab_size, create_attention_mask, eod_mask_loss, reset_position_ids,
        reset_attention_mask))

    def build() -> list:
        if not is_built_on_rank():
            return [None, None, None]
        with atomic_index_writes():
            return BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, config).build()

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        def lone_build() -> list:
            with _as_lone_process():
                return build()

        train, valid, test = build_in_turn(config.path_to_cache, lone_build, "dataset index cache")
    else:
        with _process_group_for_megatron():
            train, valid, test = build()
    return GPTDatasets(train, valid, test)


def _checked_config(data_path, split, seq_length, seed, train_samples, valid_samples, tokenizer, cache_dir,
                    test_samples, padded_vocab_size, create_attention_mask, eod_mask_loss,
                    reset_position_ids, reset_attention_mask) -> tuple[GPTDatasetConfig, list[int]]:
    """build_gpt_datasets' checks (one ValueError each) and megatron's config for them."""
    if seq_length < 1 or train_samples < 1 or valid_samples < 0 or test_samples < 0:
        raise ValueError(
            f"need seq_length >= 1, train_samples >= 1 and non-negative valid/test samples; "
            f"got {seq_length}, {train_samples}, {valid_samples}, {test_samples}"
        )
    prefixes, weights = parse_blend(data_path)
    infos = [inspect_indexed_dataset(prefix) for prefix in prefixes]
    if padded_vocab_size is not None:
        check_vocab_fits(tokenizer.vocab_size, padded_vocab_size)
        for info in infos:
            check_token_ids(info, padded_vocab_size)
    sizes = [train_samples, valid_samples, test_samples]
    matrix = _split_matrix(split)
    _check_splits_have_documents(infos, matrix, sizes, split)
    if weights is None and len(prefixes) > 1:
        weights = [float(info.tokens) for info in infos]
    ensure_helpers_cpp()

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=str(Path(cache_dir) if cache_dir else default_cache_dir() / "indices"),
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    # Splits nobody samples from are dropped here rather than built as a full epoch.
    config.split_matrix = [
        m if n > 0 else None for m, n in zip(config.split_matrix, sizes, strict=True)
    ]
    return config, sizes
