"""The lmstack tokenizer: a Hugging Face tokenizer directory in, the same ids as ``transformers`` out.

A :class:`Tokenizer` wraps a Rust ``tokenizers.Tokenizer`` (a SentencePiece ``tokenizer.model`` is
converted to one at load time) plus what lives beside it in ``tokenizer_config.json``: the named
special tokens and the chat template. Loading follows what ``transformers.AutoTokenizer`` does with
the same directory, so that encodes, decodes and rendered chats are identical, and
:meth:`Tokenizer.save_pretrained` writes a directory that ``transformers`` loads back unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as RustTokenizer

from lmstack.core._errors import TokenizerError
from lmstack.core.tokenizer._chat_template import INTERNLM2_CHAT_TEMPLATE, render_chat_template
from lmstack.core.tokenizer._hf_files import (
    NAMED_SPECIAL_TOKENS,
    TokenSpec,
    read_tokenizer_dir,
    token_content,
    tokenizer_files,
    write_tokenizer_dir,
)

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer"]

# Hugging Face's clean-up of spaces before punctuation, applied on decode only when the config asks.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


class Tokenizer:
    """A text tokenizer with special tokens and a chat template.

    Build one with :meth:`from_pretrained` (a Hugging Face tokenizer directory) or
    :func:`~lmstack.core.tokenizer.train_bpe_tokenizer`, or wrap a ``tokenizers.Tokenizer``
    directly. Named special tokens missing from the backend's added tokens are added to it as
    special tokens, as ``transformers`` does, so they are matched whole in text and skipped by
    ``decode(..., skip_special_tokens=True)``.

    Args:
        backend: The Rust tokenizer. It is used as is (not copied).
        bos_token: Beginning-of-sequence token.
        eos_token: End-of-sequence token.
        unk_token: Unknown token.
        pad_token: Padding token.
        additional_special_tokens: Further special tokens (such as ``<|im_start|>``).
        chat_template: A Jinja2 chat template, or a mapping of template name to template (the one
            named ``default`` is used unless another is asked for).
        clean_up_tokenization_spaces: Remove spaces before punctuation when decoding (Hugging Face's
            legacy option; as there, it is ignored for BPE models).
        named_special_tokens: Other named special tokens (``sep_token``, ``cls_token``,
            ``mask_token`` or model-specific ones such as ``image_token``); they are visible to chat
            templates under their names.
        name_or_path: Where the tokenizer came from, for messages.
    """

    def __init__(
        self,
        backend: RustTokenizer,
        *,
        bos_token: TokenSpec | None = None,
        eos_token: TokenSpec | None = None,
        unk_token: TokenSpec | None = None,
        pad_token: TokenSpec | None = None,
        additional_special_tokens: Sequence[TokenSpec] = (),
        chat_template: str | Mapping[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        named_special_tokens: Mapping[str, TokenSpec | None] | None = None,
        name_or_path: str = "",
    ) -> None:
        if not isinstance(backend, RustTokenizer):
            raise TokenizerError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        self._backend = backend
        self._name_or_path = name_or_path
        named: dict[str, TokenSpec | None] = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
        }
        named.update(named_special_tokens or {})
        self._named: dict[str, str] = {}
        for key in sorted(
            named,
            key=lambda k: (
                NAMED_SPECIAL_TOKENS.index(k) if k in NAMED_SPECIAL_TOKENS else len(NAMED_SPECIAL_TOKENS)
            ),
        ):
            value = named[key]
            if value is not None:
                self._named[key] = token_content(value)
        self._extra: list[str] = []
        for token in additional_special_tokens:
            if token_content(token) not in self._extra:
                self._extra.append(token_content(token))
        if chat_template is None:
            self._chat_templates: dict[str, str] = {}
        elif isinstance(chat_template, str):
            self._chat_templates = {"default": chat_template}
        else:
            self._chat_templates = dict(chat_template)
        self._single_template = isinstance(chat_template, str)
        self._clean_up = bool(clean_up_tokenization_spaces)
        self._kept_config: dict[str, Any] = {}
        self._sentencepiece_bytes: bytes | None = None
        self._warned_default_template = False
        given = [value for value in named.values() if value is not None]
        self._register_special_tokens([*given, *additional_special_tokens])

    def _register_special_tokens(self, tokens: Sequence[TokenSpec]) -> None:
        # As transformers: special tokens the backend does not yet know as added tokens become special
        # added tokens (an existing vocabulary entry keeps its id), so text containing them splits there.
        known = {token.content for token in self._backend.get_added_tokens_decoder().values()}
        named = set(self._named.values())
        missing: list[AddedToken] = []
        for token in tokens:
            content = token_content(token)
            if content in known or any(t.content == content for t in missing):
                continue
            if isinstance(token, AddedToken):
                if not token.special and content in named:
                    token = AddedToken(
                        content,
                        single_word=token.single_word,
                        lstrip=token.lstrip,
                        rstrip=token.rstrip,
                        normalized=token.normalized,
                        special=True,
                    )
                missing.append(token)
            else:
                missing.append(AddedToken(content, special=True))
        if missing:
            self._backend.add_tokens(missing)

    # ------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads a tokenizer from a local Hugging Face tokenizer (or model) directory.

        Reads ``tokenizer.json`` or, when there is none, a SentencePiece ``tokenizer.model`` (needs
        ``pip install lmstack-core[sentencepiece]``), plus ``tokenizer_config.json`` (special tokens,
        ``added_tokens_decoder``, ``chat_template`` as a string or a list of named templates),
        ``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` (which take precedence over
        the config's template) and the legacy ``special_tokens_map.json``. As in ``transformers``,
        ``add_bos_token``/``add_eos_token`` apply only to a SentencePiece model: a tokenizer.json
        carries its own post-processor.

        Args:
            path: The directory.

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: The directory does not exist, holds no tokenizer files, or a file in it is
                corrupt; the message names the file and what to do.
        """
        files = read_tokenizer_dir(path)
        named = dict(files.special_tokens)
        standard = {k: named.pop(k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        tokenizer = cls(
            files.backend,
            **standard,
            additional_special_tokens=files.additional_special_tokens,
            chat_template=files.chat_template,
            clean_up_tokenization_spaces=files.clean_up_tokenization_spaces,
            named_special_tokens=named,
            name_or_path=str(files.root),
        )
        tokenizer._kept_config = files.kept_config
        tokenizer._sentencepiece_bytes = files.sentencepiece_bytes
        if files.post_processor is not None:
            add_bos, add_eos = files.post_processor
            tokenizer._set_post_processor(add_bos=add_bos, add_eos=add_eos)
        logger.debug("loaded tokenizer from %s (%d tokens)", files.root, tokenizer.vocab_size)
        return tokenizer

    def _set_post_processor(self, *, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.bos_token, self.eos_token
        add_bos = add_bos and bos is not None and self.bos_token_id is not None
        add_eos = add_eos and eos is not None and self.eos_token_id is not None
        single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
        pair = " ".join(
            [single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])]
        )
        special: list[tuple[str, int]] = []
        if add_bos:
            special.append((str(bos), int(self.bos_token_id)))  # type: ignore[arg-type]
        if add_eos:
            special.append((str(eos), int(self.eos_token_id)))  # type: ignore[arg-type]
        self._backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    # ------------------------------------------------------------------------------------------
    # vocabulary and special tokens
    # ------------------------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> RustTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for offsets, pre-tokenization and the like)."""
        return self._backend

    @property
    def name_or_path(self) -> str:
        """The directory this tokenizer was loaded from, or an empty string."""
        return self._name_or_path

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the embedding rows a model needs at least)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """Returns the token -> id mapping, added tokens included."""
        return dict(self._backend.get_vocab(with_added_tokens=True))

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token, or None."""
        return self._named.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token, or None."""
        return self._named.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        """The padding token, or None."""
        return self._named.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        """The unknown-token token, or None."""
        return self._named.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of :attr:`bos_token`, or None."""
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of :attr:`eos_token`, or None."""
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Id of :attr:`pad_token`, or None."""
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        """Id of :attr:`unk_token`, or None."""
        return self._id_of(self.unk_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens (``bos_token`` ... and model-specific ones) that are set."""
        return dict(self._named)

    @property
    def additional_special_tokens(self) -> list[str]:
        """Special tokens beyond the named ones, as listed in the config."""
        return list(self._extra)

    @property
    def all_special_tokens(self) -> list[str]:
        """Named and additional special tokens, then every other added token marked special."""
        tokens: list[str] = []
        for token in [*self._named.values(), *self._extra]:
            if token not in tokens:
                tokens.append(token)
        decoder = self._backend.get_added_tokens_decoder()
        for index in sorted(decoder):
            if decoder[index].special and decoder[index].content not in tokens:
                tokens.append(decoder[index].content)
        return tokens

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of :attr:`all_special_tokens` (each once)."""
        ids: list[int] = []
        for token in self.all_special_tokens:
            index = self._id_of(token)
            if index is not None and index not in ids:
                ids.append(index)
        return ids

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        index = self._backend.token_to_id(token)
        return None if index is None else int(index)

    def token_to_id(self, token: str) -> int | None:
        """Returns the id of ``token``, or None when it is not in the vocabulary."""
        return self._id_of(token)

    def id_to_token(self, id: int) -> str | None:
        """Returns the token with id ``id``, or None when there is none."""
        if int(id) < 0:
            return None
        token = self._backend.id_to_token(int(id))
        return None if token is None else str(token)

    # ------------------------------------------------------------------------------------------
    # encoding and decoding
    # ------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Encodes a text to token ids.

        Args:
            text: The text. Special tokens written in it are matched whole.
            add_special_tokens: Apply the post-processor (adds bos and/or eos where the tokenizer does).

        Returns:
            The ids.

        Raises:
            TokenizerError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TokenizerError(
                f"encode() takes a str, got {type(text).__name__}; use encode_batch() for a list"
            )
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encodes several texts at once, in parallel in the Rust encoder.

        Args:
            texts: The texts.
            add_special_tokens: As in :meth:`encode`.

        Returns:
            One list of ids per text.

        Raises:
            TokenizerError: ``texts`` is a single string or holds a non-string.
        """
        if isinstance(texts, str):
            raise TokenizerError(
                "encode_batch() takes a list of texts, got a single str; use encode() for one text"
            )
        batch = list(texts)
        for index, text in enumerate(batch):
            if not isinstance(text, str):
                raise TokenizerError(f"encode_batch(): texts[{index}] is a {type(text).__name__}, not a str")
        if not batch:
            return []
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [list(encoding.ids) for encoding in encode(batch, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Decodes token ids to text.

        Args:
            ids: The ids (a list, or anything with ``tolist()`` such as a tensor).
            skip_special_tokens: Leave out special tokens.

        Returns:
            The text.

        Raises:
            TokenizerError: ``ids`` holds something that is not a non-negative integer.
        """
        text = self._backend.decode(self._ids(ids), skip_special_tokens=skip_special_tokens)
        return self._clean(text)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """Decodes several id sequences at once.

        Args:
            batch: The id sequences.
            skip_special_tokens: Leave out special tokens.

        Returns:
            One text per sequence.

        Raises:
            TokenizerError: A sequence holds something that is not a non-negative integer.
        """
        rows = batch.tolist() if hasattr(batch, "tolist") else batch
        sequences = [self._ids(row) for row in rows]
        if not sequences:
            return []
        texts = self._backend.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
        return [self._clean(text) for text in texts]

    @staticmethod
    def _ids(ids: Any) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError) as exc:
            raise TokenizerError(f"token ids must be integers, got {ids!r:.120}") from exc
        if any(i < 0 for i in out):
            raise TokenizerError(f"token ids must be non-negative, got {min(out)}")
        return out

    def _clean(self, text: str) -> str:
        # As transformers: the clean-up would corrupt BPE output, so it only runs for other models.
        if not self._clean_up or type(self._backend.model).__name__ == "BPE":
            return text
        for old, new in _CLEANUP:
            text = text.replace(old, new)
        return text

    # ------------------------------------------------------------------------------------------
    # chat templates
    # ------------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template (the one named ``default`` when there are several), or None."""
        return self._chat_templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        """All chat templates by name (a single template is named ``default``)."""
        return dict(self._chat_templates)

    def _resolve_template(self, chat_template: str | None, tools: Any) -> str:
        if chat_template is not None:
            # A name picks one of the tokenizer's templates; anything else is template text.
            return self._chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if "default" in self._chat_templates:
            return self._chat_templates["default"]
        if self._chat_templates:
            raise TokenizerError(
                f"this tokenizer has several chat templates and none is named 'default': pass "
                f"chat_template= one of {sorted(self._chat_templates)} (or a template string)"
            )
        if not self._warned_default_template:
            logger.warning(
                "tokenizer %s has no chat template; using the built-in InternLM2 ChatML template",
                self._name_or_path or "(in memory)",
            )
            self._warned_default_template = True
        return INTERNLM2_CHAT_TEMPLATE

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Renders a conversation with the model's chat template, as ``transformers`` does.

        Args:
            messages: The conversation: dicts with ``role`` and ``content`` (plus whatever the template
                reads, such as ``tool_calls``).
            add_generation_prompt: End with the header that starts an assistant turn.
            tokenize: Return token ids instead of text. The text is encoded without adding special
                tokens, because templates write the bos token themselves.
            tools: JSON schemas of the tools the model may call.
            chat_template: A template string, or the name of one of :attr:`chat_templates`. By
                default the tokenizer's own template (its ``tool_use`` template when ``tools`` are
                given and it has one); the built-in InternLM2 ChatML when it has none.
            **template_kwargs: Further template variables (``documents``, ``enable_thinking`` ...).

        Returns:
            The rendered text, or its ids when ``tokenize`` is set.

        Raises:
            TokenizerError: Malformed messages or tools, a template syntax error, the template calling
                ``raise_exception()`` (its message is kept) or failing otherwise.
        """
        template = self._resolve_template(chat_template, tools)
        special = {key: value for key, value in self._named.items() if value is not None}
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=special,
            **template_kwargs,
        )
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    # ------------------------------------------------------------------------------------------
    # saving
    # ------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Writes the tokenizer as a Hugging Face tokenizer directory.

        Writes ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, added tokens and the chat
        template) and ``special_tokens_map.json`` (plus ``tokenizer.model`` for a tokenizer read from
        one); ``transformers.AutoTokenizer`` loads the result with identical encodes and chats. The
        directory is replaced in one atomic step (:func:`~lmstack.core.atomic_directory`), so a
        failure leaves an existing directory as it was. Other files in ``path`` (model weights ...)
        are kept; a stale ``chat_template.jinja`` or ``added_tokens.json``, which would override what
        is written, is removed.

        Args:
            path: The directory; created if missing.

        Raises:
            TokenizerError: The directory cannot be written (the original is left intact).
        """
        files = tokenizer_files(
            self._backend,
            special_tokens=self._named,
            additional_special_tokens=self._extra,
            chat_templates=self._chat_templates,
            single_template=self._single_template,
            clean_up_tokenization_spaces=self._clean_up,
            kept_config=self._kept_config,
            sentencepiece_bytes=self._sentencepiece_bytes,
        )
        target = write_tokenizer_dir(path, files)
        logger.info("saved tokenizer to %s", target)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name_or_path={self._name_or_path!r}, vocab_size={self.vocab_size}, "
            f"model={type(self._backend.model).__name__}, special_tokens={self._named}, "
            f"chat_template={'yes' if self._chat_templates else 'no'})"
        )
