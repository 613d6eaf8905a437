"""Turn a SentencePiece ``tokenizer.model`` into an equivalent ``tokenizers.Tokenizer``.

Converting once at load time lets every tokenizer, whatever its origin, go through the same Rust
pipeline (batch encoding, added tokens, ``tokenizer.json`` on save). The model file is a protobuf;
the few fields needed are read straight off the wire so that no protobuf runtime is required.
SentencePiece itself is still required, to validate the file exactly as it would be used.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE, Unigram

from lmstack.core._errors import TokenizerError

logger = logging.getLogger(__name__)

__all__ = [
    "SentencePieceModel",
    "control_pieces",
    "load_sentencepiece",
    "piece_names",
    "sentencepiece_to_tokenizers",
]

_INSTALL_HINT = "pip install lmstack-core[sentencepiece]"

# SentencePiece piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType.
_UNIGRAM, _BPE = 1, 2
_MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class SentencePieceModel:
    """The parts of a SentencePiece ModelProto that the conversion needs (defaults as in the .proto)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)
    model_type: int = _UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    def piece_or_none(self, index: int) -> str | None:
        """Returns the piece at ``index``, or None when the id is disabled (-1) or out of range."""
        if 0 <= index < len(self.pieces):
            return self.pieces[index][0]
        return None


# --------------------------------------------------------------------------------------------
# protobuf wire format, just enough for ModelProto
# --------------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Splits a serialized message into (field number, wire type, raw value) triples."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        out.append((number, wire, value))
    return out


def _int32(value: int) -> int:
    # Negative int32 values are sign-extended to 64 bits on the wire.
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_model_proto(data: bytes) -> SentencePieceModel:
    """Reads the pieces, trainer spec and normalizer spec out of a serialized ModelProto.

    Args:
        data: The bytes of a ``tokenizer.model`` file.

    Returns:
        The parsed fields.

    Raises:
        ValueError: The bytes are not a well-formed ModelProto.
    """
    model = SentencePieceModel()
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:
            piece, score, kind = "", 0.0, _NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            model.pieces.append((piece, score, kind))
        elif number == 2 and wire == 2:
            for n, w, v in _fields(value):
                if w == 0:
                    if n == 3:
                        model.model_type = v
                    elif n == 35:
                        model.byte_fallback = bool(v)
                    elif n == 40:
                        model.unk_id = _int32(v)
                    elif n == 41:
                        model.bos_id = _int32(v)
                    elif n == 42:
                        model.eos_id = _int32(v)
                    elif n == 43:
                        model.pad_id = _int32(v)
                elif w == 2 and n in (45, 46, 47, 48):
                    name = {45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece"}[n]
                    setattr(model, name, v.decode("utf-8"))
        elif number == 3 and wire == 2:
            for n, w, v in _fields(value):
                if n == 2 and w == 2:
                    model.precompiled_charsmap = bytes(v)
                elif n == 3 and w == 0:
                    model.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    model.remove_extra_whitespaces = bool(v)
                elif n == 5 and w == 0:
                    model.escape_whitespaces = bool(v)
    return model


# --------------------------------------------------------------------------------------------
# loading and conversion
# --------------------------------------------------------------------------------------------


def load_sentencepiece(path: str | os.PathLike[str]) -> tuple[SentencePieceModel, bytes]:
    """Validates a SentencePiece model with the sentencepiece library and parses it.

    Args:
        path: The ``tokenizer.model`` file.

    Returns:
        The parsed model and the raw file bytes (kept so that a save can copy the file).

    Raises:
        TokenizerError: sentencepiece is not installed, or the file is not a SentencePiece model.
    """
    try:
        import sentencepiece
    except ImportError as exc:
        raise TokenizerError(
            f"{path} is a SentencePiece model and there is no tokenizer.json beside it; reading it needs the "
            f"sentencepiece package: `{_INSTALL_HINT}` (or convert it to a tokenizer.json)."
        ) from exc
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        processor = sentencepiece.SentencePieceProcessor()
        processor.LoadFromSerializedProto(data)
        model = parse_model_proto(data)
    except (OSError, RuntimeError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise TokenizerError(
            f"could not read the SentencePiece model {path}: {exc}. The file is corrupt or not a "
            "SentencePiece model; replace it with the model's original tokenizer.model or tokenizer.json."
        ) from exc
    if len(model.pieces) != processor.GetPieceSize():
        raise TokenizerError(
            f"could not read the SentencePiece model {path}: found {len(model.pieces)} pieces where "
            f"sentencepiece reports {processor.GetPieceSize()}; the file looks damaged."
        )
    if model.model_type not in (_UNIGRAM, _BPE):
        kind = _MODEL_TYPE_NAMES.get(model.model_type, str(model.model_type))
        raise TokenizerError(
            f"the SentencePiece model {path} is of type {kind!r}; only 'unigram' and 'bpe' models are "
            "supported. Convert it to a tokenizer.json first."
        )
    return model, data


def _bpe_merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    # SentencePiece BPE has no merge table: a piece's score is its merge priority, so every split of
    # a normal piece into two normal pieces is a merge, ranked by the merged piece's score (then id).
    normal = {piece: (score, index) for index, (piece, score, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked: list[tuple[float, int, str, str]] = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def piece_names(model: SentencePieceModel, renames: dict[int, str] | None = None) -> list[str]:
    """The pieces by id, after ``renames`` (a rename onto a name another piece keeps is skipped)."""
    names = [piece for piece, _, _ in model.pieces]
    if renames:
        kept = {name for index, name in enumerate(names) if index not in renames}
        for index, new_name in renames.items():
            if 0 <= index < len(names) and new_name not in kept:
                names[index] = new_name
    return names


def control_pieces(model: SentencePieceModel, renames: dict[int, str] | None = None) -> list[str]:
    """Control pieces (``<s>``, ``</s>``, declared control symbols), which Hugging Face treats as special."""
    names = piece_names(model, renames)
    return [names[index] for index, (_, _, kind) in enumerate(model.pieces) if kind == _CONTROL]


def sentencepiece_to_tokenizers(
    model: SentencePieceModel, *, legacy: bool = True, renames: dict[int, str] | None = None
) -> RustTokenizer:
    """Builds a ``tokenizers.Tokenizer`` that encodes and decodes like the SentencePiece model.

    Args:
        model: The parsed SentencePiece model.
        legacy: Give every chunk between added tokens its own dummy prefix, as SentencePiece does when
            it is run on each chunk separately (the long-standing Hugging Face default). When False
            only the start of the text gets the prefix.
        renames: Pieces to rename, by id (``added_tokens_decoder`` entries that give a placeholder piece
            a new name).

    Returns:
        The equivalent Rust tokenizer, without special-token handling or post-processor.
    """
    names = piece_names(model, renames)
    pieces = [(names[i], score, kind) for i, (_, score, kind) in enumerate(model.pieces)]
    user_defined = [piece for piece, _, kind in pieces if kind == _USER_DEFINED]
    unk = model.piece_or_none(model.unk_id)

    tokenizer: RustTokenizer
    if model.model_type == _BPE:
        vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
        tokenizer = RustTokenizer(
            BPE(
                vocab=vocab,
                merges=_bpe_merges(pieces, vocab),
                unk_token=unk,
                fuse_unk=True,
                byte_fallback=model.byte_fallback,
                # User-defined pieces are isolated by the pre-tokenizer below and must stay whole.
                ignore_merges=bool(user_defined),
            )
        )
    else:
        tokenizer = RustTokenizer(
            Unigram(
                [(piece, score) for piece, score, _ in pieces],
                unk_id=model.unk_id if unk is not None else None,
                byte_fallback=model.byte_fallback,
            )
        )

    # Normalization in SentencePiece's own order: character map, whitespace clean-up, escaping.
    steps: list[normalizers.Normalizer] = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        # Only U+0020 counts here; the character map has already turned other blanks into it.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if model.add_dummy_prefix and legacy:
        # Metaspace would not add the prefix to text already starting with "▁"; SentencePiece does.
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)

    splitters: list[pre_tokenizers.PreTokenizer] = []
    if model.add_dummy_prefix:
        scheme = "always" if legacy else "first"
        splitters.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False))
    if user_defined:
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
        splitters.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if splitters:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splitters)

    steps_out: list[decoders.Decoder] = [decoders.Replace("▁", " ")]
    if model.byte_fallback:
        steps_out.append(decoders.ByteFallback())
    if model.add_dummy_prefix:
        # Strip works token by token, so fuse first to drop only the text's leading space.
        steps_out += [decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)]
    elif model.byte_fallback:
        steps_out.append(decoders.Fuse())
    tokenizer.decoder = decoders.Sequence(steps_out)
    return tokenizer
