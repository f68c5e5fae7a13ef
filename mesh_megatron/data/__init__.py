"""Data side of mesh-megatron: tokenizers, indexed datasets, blending. Never imports the model.

Import from the submodules (this package imports nothing, so e.g. ``vocab`` stays cheap):

    tokenizer      SentencePieceTokenizer, HFTokenizer, build_tokenizer
    vocab          pad_vocab_size, check_vocab_fits
    preprocessing  preprocess (jsonl/txt -> PREFIX.bin/.idx), StagedPrefix
    validation     inspect_indexed_dataset, check_token_ids
    datasets       build_gpt_datasets, parse_blend
    embedded       prepare_embedded_dataset, embedded_tokenizer (the shipped corpus)
    cpp_helpers    ensure_helpers_cpp
    cache          default_cache_dir
"""
