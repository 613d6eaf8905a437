"""Training a byte-level BPE tokenizer on a corpus (the Rust ``tokenizers`` trainer does the work)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from lmstack.core._errors import TokenizerError
from lmstack.core.tokenizer._chat_template import INTERNLM2_CHAT_TEMPLATE
from lmstack.core.tokenizer._tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["train_bpe_tokenizer"]

# Byte-level BPE starts from one token per byte value.
_BYTE_ALPHABET_SIZE = 256


def _resolve_files(files: Sequence[str | os.PathLike[str]]) -> list[str]:
    paths: list[str] = []
    for index, item in enumerate(files):
        if not isinstance(item, (str, os.PathLike)):
            raise TokenizerError(
                f"files[{index}] is a {type(item).__name__}; pass file paths, or an iterator of texts"
            )
        path = Path(item)
        if not path.is_file():
            hint = (
                " (to train on in-memory texts, pass an iterator or generator of strings, e.g. iter(texts))"
                if isinstance(item, str) and ("\n" in item or not path.suffix)
                else ""
            )
            raise TokenizerError(f"training file {str(item)[:200]!r} does not exist or is not a file{hint}")
        paths.append(str(path))
    return paths


class _CountingTexts:
    """Iterates over the training texts, checking their type and counting the non-empty ones."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.non_empty = 0

    def __iter__(self) -> Iterator[str]:
        for index, text in enumerate(self._texts):
            if not isinstance(text, str):
                raise TokenizerError(f"training text #{index} is a {type(text).__name__}, not a str")
            if text:
                self.non_empty += 1
            yield text


def train_bpe_tokenizer(
    files: Sequence[str | os.PathLike[str]] | Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = ("<s>", "</s>", "<unk>", "<pad>", "<|im_start|>", "<|im_end|>"),
    min_frequency: int = 2,
    chat_template: str | None = INTERNLM2_CHAT_TEMPLATE,
    bos_token: str | None = "<s>",
    eos_token: str | None = "</s>",
    pad_token: str | None = "<pad>",
    unk_token: str | None = "<unk>",
    show_progress: bool = False,
) -> Tokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style: any text encodes, and decodes back exactly).

    The special tokens take the first ids, in the order given; encoding adds ``bos_token`` at the
    start (a ``TemplateProcessing`` post-processor). After :meth:`Tokenizer.save_pretrained` the
    directory loads in ``transformers.AutoTokenizer`` with identical ids.

    Args:
        files: Either a list (or tuple) of text-file paths (or one path), or any other iterable of
            texts, such as a generator or ``iter(list_of_texts)``. A list is always read as paths.
        vocab_size: Target vocabulary size, special tokens included. Training stops earlier when no
            pair occurs ``min_frequency`` times.
        special_tokens: Special tokens, given ids 0, 1, ...; the named tokens below are appended when
            missing from it.
        min_frequency: Minimum count of a pair for it to be merged.
        chat_template: Chat template stored with the tokenizer (the built-in InternLM2 ChatML by default).
        bos_token: Beginning-of-sequence token (added by encode), or None for none.
        eos_token: End-of-sequence token, or None.
        pad_token: Padding token, or None.
        unk_token: Unknown token (never produced by byte-level BPE, kept for configs that expect one).
        show_progress: Show the trainer's progress bar.

    Returns:
        The trained tokenizer.

    Raises:
        TokenizerError: ``vocab_size`` is too small for the byte alphabet plus the special tokens, the
            corpus is empty, or a file is missing or unreadable.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TokenizerError(f"vocab_size must be an int, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise TokenizerError(f"min_frequency must be a positive int, got {min_frequency!r}")
    specials: list[str] = []
    for token in [*special_tokens, bos_token, eos_token, unk_token, pad_token]:
        if token is None:
            continue
        if not isinstance(token, str) or not token:
            raise TokenizerError(f"special tokens must be non-empty strings, got {token!r}")
        if token not in specials:
            specials.append(token)
    minimum = _BYTE_ALPHABET_SIZE + len(specials)
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs {_BYTE_ALPHABET_SIZE} byte "
            f"tokens plus {len(specials)} special tokens, so at least {minimum} (more to learn merges)."
        )

    backend = RustTokenizer(BPE())
    # No normalizer and no prefix space: decode(encode(text)) gives back exactly the text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    if isinstance(files, (str, os.PathLike)):
        files = [files]
    try:
        if isinstance(files, Sequence):
            paths = _resolve_files(files)
            if not paths or all(os.path.getsize(p) == 0 for p in paths):
                raise TokenizerError("the training corpus is empty: the files hold no text")
            backend.train(paths, trainer=trainer)
        elif isinstance(files, Iterable):
            texts = _CountingTexts(files)
            backend.train_from_iterator(texts, trainer=trainer)
            if texts.non_empty == 0:
                raise TokenizerError("the training corpus is empty: the iterable yielded no non-empty text")
        else:
            raise TokenizerError(
                f"files must be a list of paths or an iterable of texts, got {type(files).__name__}"
            )
    except TokenizerError:
        raise
    except Exception as exc:  # the Rust trainer raises bare Exceptions (unreadable file, bad UTF-8)
        raise TokenizerError(f"training the BPE tokenizer failed: {exc}") from exc

    if bos_token is not None:
        bos_id = backend.token_to_id(bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0",
            pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, bos_id)],
        )
    learned = backend.get_vocab_size(with_added_tokens=True)
    if learned < vocab_size:
        logger.info(
            "BPE training stopped at %d tokens (asked for %d): no pair left occurring %d times",
            learned,
            vocab_size,
            min_frequency,
        )
    named = {bos_token, eos_token, unk_token, pad_token}
    return Tokenizer(
        backend,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        pad_token=pad_token,
        additional_special_tokens=[token for token in specials if token not in named],
        chat_template=chat_template,
    )
