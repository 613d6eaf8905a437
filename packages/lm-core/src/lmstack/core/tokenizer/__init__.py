"""Tokenizers and chat templates.

:class:`Tokenizer` loads a Hugging Face tokenizer directory (``tokenizer.json``, or a SentencePiece
``tokenizer.model``) and gives the same ids and chat renderings as ``transformers``;
:func:`train_bpe_tokenizer` trains a byte-level BPE tokenizer on a corpus;
:data:`INTERNLM2_CHAT_TEMPLATE` is the built-in ChatML template used when a tokenizer has none.
"""

from __future__ import annotations

from lmstack.core.tokenizer._bpe import train_bpe_tokenizer
from lmstack.core.tokenizer._chat_template import INTERNLM2_CHAT_TEMPLATE
from lmstack.core.tokenizer._tokenizer import Tokenizer

__all__ = ["INTERNLM2_CHAT_TEMPLATE", "Tokenizer", "train_bpe_tokenizer"]
