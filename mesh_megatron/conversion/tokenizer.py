"""The run's tokenizer, next to exported weights, in a form `AutoTokenizer` loads offline.

* sentencepiece: the `.model` file is copied as `tokenizer.model` (the exact tokenizer the
  model was trained with), and converted to a `tokenizers` BPE/Unigram (transformers'
  `SpmConverter.build_tokenizer_from_spm_proto`, which follows the model's own normaliser
  settings) saved as `tokenizer.json` + `tokenizer_config.json`. The conversion is checked
  against sentencepiece on probe texts; if any differ, only `tokenizer.model` is written and
  a warning says so (load it with sentencepiece then).
* hf: the run's `tokenizer.json` is saved with a `tokenizer_config.json` naming its EOD
  token as eos (and bos, as GPT-NeoX does) and its pad token when it has one.

No BOS is added on encode: training data is raw token ids with EOD between documents.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

# Texts whose encodings must agree between sentencepiece and the converted tokenizer.
PROBE_TEXTS = (
    "Hello world",
    " leading space, trailing space ",
    "Two  spaces\tand a tab\nnew line\n\n  indented",
    "def f(x):\n    return x ** 2  # 12345 67.8",
    "unicode: naïve café 日本語 😀 ∑",
    "",
)


@dataclass(frozen=True)
class TokenizerExport:
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    pad_token_id: Optional[int]
    files: tuple[str, ...]  # written into the export directory
    warning: Optional[str] = None


def _fast_from_sentencepiece(path: str):
    """(tokenizers.Tokenizer, proto) converted from a sentencepiece model file."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    if proto.trainer_spec.model_type != 2:  # 2 = BPE; Unigram wants a (piece, score) list
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if tokenizer is None:
        return None, proto
    # unk (type 2) and control pieces (type 3: <s>, </s>, <pad>) are specials, never split
    specials = [p.piece for p in proto.pieces if p.type in (2, 3)]
    tokenizer.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return tokenizer, proto


def _sentencepiece(path: str, out_dir: str, model_max_length: int) -> TokenizerExport:
    import sentencepiece as spm

    shutil.copyfile(path, os.path.join(out_dir, "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=path)
    ids = {name: (i if i >= 0 else None) for name, i in
           (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id()))}
    files = ["tokenizer.model"]
    try:
        fast, _ = _fast_from_sentencepiece(path)
    except Exception as e:  # an exotic model the converter does not know
        fast, warning = None, f"no tokenizer.json: converting {path} failed ({type(e).__name__}: {e})"
    else:
        warning = None if fast is not None else "no tokenizer.json: the sentencepiece model type is not convertible"
    if fast is not None:
        bad = [t for t in PROBE_TEXTS if fast.encode(t, add_special_tokens=False).ids != sp.encode(t)]
        if bad:
            fast, warning = None, (f"no tokenizer.json: the converted tokenizer encodes {bad[0]!r} differently "
                                   "from sentencepiece; load tokenizer.model with sentencepiece")
    if fast is not None:
        from transformers import PreTrainedTokenizerFast

        def piece(i):
            return sp.id_to_piece(i) if i is not None else None

        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=fast, bos_token=piece(ids["bos"]), eos_token=piece(ids["eos"]),
            unk_token=piece(ids["unk"]), pad_token=piece(ids["pad"]), model_max_length=model_max_length)
        files += [os.path.basename(f) for f in wrapped.save_pretrained(out_dir)]
    return TokenizerExport(ids["bos"], ids["eos"], ids["pad"], tuple(sorted(set(files))), warning)


def _tokenizer_json(path: str, out_dir: str, model_max_length: int) -> TokenizerExport:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from mesh_megatron.data.tokenizer import EOD_CANDIDATES, PAD_CANDIDATES

    vocab = Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
    eod = next((t for t in EOD_CANDIDATES if t in vocab), None)
    pad = next((t for t in PAD_CANDIDATES if t in vocab and t != eod), None)
    wrapped = PreTrainedTokenizerFast(tokenizer_file=path, bos_token=eod, eos_token=eod, pad_token=pad,
                                      model_max_length=model_max_length)
    files = [os.path.basename(f) for f in wrapped.save_pretrained(out_dir)]
    eod_id = vocab.get(eod) if eod else None
    return TokenizerExport(eod_id, eod_id, vocab.get(pad) if pad else None, tuple(sorted(set(files))))


def export_tokenizer(kind: str, path: str, out_dir: str, model_max_length: int) -> TokenizerExport:
    """Write the tokenizer of type `kind` ("sentencepiece" | "hf") from `path` into `out_dir`."""
    if kind == "sentencepiece":
        return _sentencepiece(path, out_dir, model_max_length)
    if kind == "hf":
        return _tokenizer_json(path, out_dir, model_max_length)
    raise ValueError(f"tokenizer type {kind!r} is unknown: expected 'sentencepiece' or 'hf'")
