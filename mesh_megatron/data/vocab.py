"""Vocabulary sizing: the model's padded vocab versus the tokenizer's."""

from __future__ import annotations


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_parallel_size: int = 1) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by * tensor_parallel_size``.

    Same rule as Megatron-LM's ``_vocab_size_with_padding``: every tensor-parallel rank
    holds an equal, GEMM-friendly slice of the embedding. 50257 -> 50304 at tp 1,
    50432 at tp 2.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if divisible_by <= 0 or tensor_parallel_size <= 0:
        raise ValueError(
            f"divisible_by ({divisible_by}) and tensor_parallel_size "
            f"({tensor_parallel_size}) must be positive"
        )
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def check_vocab_fits(tokenizer_vocab: int, padded_vocab: int) -> None:
    """Fail before training when the tokenizer can emit ids the embedding lacks."""
    if tokenizer_vocab > padded_vocab:
        raise ValueError(
            f"tokenizer vocab ({tokenizer_vocab} ids) is larger than the model's padded vocab "
            f"({padded_vocab}): ids >= {padded_vocab} would index past the embedding table. "
            f"Fix: set the model's vocab to pad_vocab_size({tokenizer_vocab}) or use the "
            "tokenizer the model was built for."
        )
