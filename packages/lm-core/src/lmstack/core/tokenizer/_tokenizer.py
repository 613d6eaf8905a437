"""The lmstack tokenizer: a Hugging Face tokenizer directory in, the same ids as ``transformers`` out.

A :class:`Tokenizer` wraps a Rust ``tokenizers.Tokenizer`` (a SentencePiece ``tokenizer.model`` is
converted to one at load time) plus what lives beside it in ``tokenizer_config.json``: the named
special tokens and the chat template. Loading follows what ``transformers.AutoTokenizer`` does with
the same directory, so that encodes, decodes and rendered chats are identical, and
:meth:`Tokenizer.save_pretrained` writes a directory that ``transformers`` loads back unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as RustTokenizer

from lmstack.core._errors import TokenizerError
from lmstack.core.tokenizer._chat_template import INTERNLM2_CHAT_TEMPLATE, render_chat_template

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SENTENCEPIECE_FILE = "tokenizer.model"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
ADDED_TOKENS_FILE = "added_tokens.json"

# The named special tokens, in the order Hugging Face lists them.
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys carried over unchanged by save_pretrained (all harmless to transformers).
_KEPT_CONFIG_KEYS = ("model_max_length", "padding_side", "truncation_side", "model_input_names")
# Files save_pretrained removes from an existing directory because they would override what it writes.
_STALE_ON_SAVE = (CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR, ADDED_TOKENS_FILE)
# Hugging Face's clean-up of spaces before punctuation, applied on decode only when the config asks.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip

TokenSpec = str | AddedToken


def _content(token: TokenSpec) -> str:
    return token.content if isinstance(token, AddedToken) else str(token)


def _token_key(token: AddedToken) -> tuple[Any, ...]:
    return (token.content, token.single_word, token.lstrip, token.rstrip, token.normalized, token.special)


def _added_token_from_json(value: Any, where: str, *, special: bool | None = None) -> AddedToken:
    """Builds an AddedToken from its JSON form (``{"content": ..., "lstrip": ...}``)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("content"), str):
        raise TokenizerError(f"{where}: expected a token such as {{'content': '<s>', ...}}, got {value!r}")
    flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
    is_special = bool(value.get("special", False)) if special is None else special
    return AddedToken(value["content"], special=is_special, **flags)


def _token_spec(value: Any, where: str) -> TokenSpec | None:
    """A special token from a config: a string, an AddedToken in JSON form, or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, AddedToken):
        return value
    return _added_token_from_json(value, where, special=True)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(
            f"could not read {path}: {exc}. The file is corrupt or truncated; restore it from the original "
            "checkpoint (or delete it if the directory has the other tokenizer files)."
        ) from exc


def _parse_chat_templates(value: Any, where: str) -> dict[str, str]:
    """Reads ``chat_template`` as stored in tokenizer_config.json: a string or a list of named templates."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, Mapping):
        items: Iterable[Any] = [{"name": k, "template": v} for k, v in value.items()]
    elif isinstance(value, list):
        items = value
    else:
        raise TokenizerError(
            f"{where}: chat_template must be a string or a list of {{name, template}} entries"
        )
    templates: dict[str, str] = {}
    for entry in items:
        if (
            not isinstance(entry, Mapping)
            or not isinstance(entry.get("name"), str)
            or not isinstance(entry.get("template"), str)
        ):
            raise TokenizerError(
                f"{where}: each entry of a chat_template list needs a string 'name' and 'template', "
                f"got {entry!r}"
            )
        templates[entry["name"]] = entry["template"]
    return templates


def _read_config(root: Path) -> tuple[dict[str, Any], list[tuple[int, AddedToken]]]:
    """Reads tokenizer_config.json and the added tokens it (or the legacy side files) declares."""
    config_path = root / CONFIG_FILE
    config: dict[str, Any] = {}
    if config_path.is_file():
        loaded = _read_json(config_path)
        if not isinstance(loaded, dict):
            raise TokenizerError(f"{config_path} must hold a JSON object, got {type(loaded).__name__}")
        config = loaded

    # Legacy side files count only when the config has no added_tokens_decoder (transformers' rule).
    added: list[tuple[int, AddedToken]] = []
    if "added_tokens_decoder" in config:
        decoder = config["added_tokens_decoder"]
        if not isinstance(decoder, Mapping):
            raise TokenizerError(f"{config_path}: added_tokens_decoder must be an object of id -> token")
        for key, value in decoder.items():
            try:
                index = int(key)
            except ValueError as exc:
                raise TokenizerError(
                    f"{config_path}: added_tokens_decoder key {key!r} is not a token id"
                ) from exc
            added.append((index, _added_token_from_json(value, f"{config_path} [{key}]")))
        added.sort(key=lambda item: item[0])
        return config, added

    special_map_path = root / SPECIAL_TOKENS_MAP_FILE
    if special_map_path.is_file():
        special_map = _read_json(special_map_path)
        if not isinstance(special_map, dict):
            raise TokenizerError(f"{special_map_path} must hold a JSON object")
        for key, value in special_map.items():
            if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                merged = list(config.get("additional_special_tokens") or [])
                merged += [token for token in value if token not in merged]
                config["additional_special_tokens"] = merged
            else:
                config[key] = value
    added_tokens_path = root / ADDED_TOKENS_FILE
    if added_tokens_path.is_file():
        encoder = _read_json(added_tokens_path)
        if not isinstance(encoder, dict):
            raise TokenizerError(f"{added_tokens_path} must map token strings to ids")
        special_names = {
            _content(spec) for k in _NAMED if (spec := _token_spec(config.get(k), str(config_path)))
        }
        for content, index in sorted(encoder.items(), key=lambda item: item[1]):
            is_special = content in special_names
            added.append((int(index), AddedToken(content, normalized=not is_special, special=is_special)))
    return config, added


def _special_tokens_from_config(
    config: Mapping[str, Any], added: list[tuple[int, AddedToken]], where: str
) -> tuple[dict[str, TokenSpec | None], list[TokenSpec]]:
    """The named special tokens (model-specific ``*_token`` keys included) and the extra list.

    A named token also listed among the added tokens takes that entry's flags, as in transformers.
    """
    named: dict[str, TokenSpec | None] = {}
    for key, value in config.items():
        if key in _NAMED or (key.endswith("_token") and isinstance(value, (str, Mapping))):
            named[key] = _token_spec(value, f"{where} [{key}]")
    extra_value = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra: list[TokenSpec] = []
    if isinstance(extra_value, Mapping):
        for key, value in extra_value.items():
            named[key] = _token_spec(value, f"{where} [extra_special_tokens.{key}]")
    elif isinstance(extra_value, list):
        for value in extra_value:
            spec = _token_spec(value, f"{where} [additional_special_tokens]")
            if spec is not None:
                extra.append(spec)
    else:
        raise TokenizerError(f"{where}: additional_special_tokens must be a list")
    by_content = {token.content: token for _, token in added}
    for key, value in named.items():
        if value is not None and _content(value) in by_content:
            named[key] = by_content[_content(value)]
    return named, extra


def _read_chat_templates(root: Path, config: Mapping[str, Any], where: str) -> str | dict[str, str] | None:
    """chat_template.jinja and additional_chat_templates/*.jinja, else the config's chat_template."""
    templates: dict[str, str] = {}
    template_file = root / CHAT_TEMPLATE_FILE
    template_dir = root / CHAT_TEMPLATE_DIR
    try:
        if template_file.is_file():
            templates["default"] = template_file.read_text(encoding="utf-8")
        if template_dir.is_dir():
            for file in sorted(template_dir.glob("*.jinja")):
                templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"could not read the chat template files in {root}: {exc}") from exc
    if templates:
        # The files replace the config's templates entirely, as in transformers.
        return templates["default"] if list(templates) == ["default"] else templates
    if isinstance(config.get("chat_template"), str):
        return str(config["chat_template"])
    return _parse_chat_templates(config.get("chat_template"), where) or None


def _unnormalized(token: AddedToken) -> AddedToken:
    return AddedToken(
        token.content,
        single_word=token.single_word,
        lstrip=token.lstrip,
        rstrip=token.rstrip,
        normalized=False,
        special=token.special,
    )


class _RestoreFailed(OSError):
    """Undoing a failed save failed as well; the previous files are still in the staging directory."""


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
        for key in sorted(named, key=lambda k: _NAMED.index(k) if k in _NAMED else len(_NAMED)):
            value = named[key]
            if value is not None:
                self._named[key] = _content(value)
        self._extra: list[str] = []
        for token in additional_special_tokens:
            if _content(token) not in self._extra:
                self._extra.append(_content(token))
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
            content = _content(token)
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
        root = Path(path)
        if not root.exists():
            raise TokenizerError(
                f"tokenizer directory {str(root)!r} does not exist. Pass a local directory containing "
                "tokenizer.json (lmstack does not download from the Hub: fetch the checkpoint first)."
            )
        if not root.is_dir():
            raise TokenizerError(
                f"{str(root)!r} is a file; Tokenizer.from_pretrained expects the directory that contains "
                "tokenizer.json (and tokenizer_config.json)."
            )
        config_path = root / CONFIG_FILE
        config, added_from_config = _read_config(root)
        named, extra = _special_tokens_from_config(config, added_from_config, str(config_path))

        tokenizer_json = root / TOKENIZER_FILE
        sentencepiece_path = root / SENTENCEPIECE_FILE
        sentencepiece_bytes: bytes | None = None
        add_bos = add_eos = False
        rebuild_post_processor = False
        if tokenizer_json.is_file():
            try:
                backend = RustTokenizer.from_file(str(tokenizer_json))
            except Exception as exc:  # the Rust side raises a bare Exception
                raise TokenizerError(
                    f"could not load {tokenizer_json}: {exc}. The file is corrupt, truncated, or was written "
                    "by an incompatible version of the tokenizers library; restore it from the original "
                    "checkpoint."
                ) from exc
            padding = backend.padding
            if padding is not None and named.get("pad_token") is None:
                named["pad_token"] = padding.get("pad_token")
            # transformers never pads or truncates through the backend on a plain encode.
            backend.no_padding()
            backend.no_truncation()
            rebuild_post_processor = backend.post_processor is None
        elif sentencepiece_path.is_file():
            from lmstack.core.tokenizer._sentencepiece import (
                control_pieces,
                load_sentencepiece,
                sentencepiece_to_tokenizers,
            )

            model, sentencepiece_bytes = load_sentencepiece(sentencepiece_path)
            size = len(model.pieces)
            renames = {index: token.content for index, token in added_from_config if index < size}
            legacy = bool(config.get("legacy", True))
            backend = sentencepiece_to_tokenizers(model, legacy=legacy, renames=renames)
            if model.add_dummy_prefix:
                # Added tokens are matched on the raw text so each chunk between them gets its own prefix.
                added_from_config = [(index, _unnormalized(token)) for index, token in added_from_config]
                named, _ = _special_tokens_from_config(config, added_from_config, str(config_path))
            proto_specials = {"bos_token": model.bos_id, "eos_token": model.eos_id, "unk_token": model.unk_id}
            for key, index in proto_specials.items():
                piece = model.piece_or_none(index)
                if named.get(key) is None and piece is not None:
                    named[key] = piece
            if not extra:
                # As transformers: control pieces are special tokens, matched whole in text.
                extra = [
                    AddedToken(p, normalized=False, special=True) for p in control_pieces(model, renames)
                ]
            add_bos = bool(config.get("add_bos_token", False))
            add_eos = bool(config.get("add_eos_token", False))
            rebuild_post_processor = True
        else:
            present = sorted(p.name for p in root.iterdir())[:20]
            raise TokenizerError(
                f"no tokenizer files in {str(root)!r}: expected {TOKENIZER_FILE} (or a SentencePiece "
                f"{SENTENCEPIECE_FILE}); found {present or 'nothing'}. Point at the checkpoint's tokenizer "
                "directory, or train one with lmstack.core.tokenizer.train_bpe_tokenizer."
            )

        # Tokens listed in added_tokens_decoder that the backend lacks (or has with other flags).
        known = {_token_key(t) for t in backend.get_added_tokens_decoder().values()}
        new_tokens = [token for _, token in added_from_config if _token_key(token) not in known]
        if new_tokens:
            backend.add_tokens(new_tokens)
        if config.get("split_special_tokens"):
            backend.encode_special_tokens = True

        chat_template = _read_chat_templates(root, config, str(config_path))

        standard = {k: named.pop(k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        tokenizer = cls(
            backend,
            **standard,
            additional_special_tokens=extra,
            chat_template=chat_template,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            named_special_tokens=named,
            name_or_path=str(root),
        )
        tokenizer._kept_config = {k: config[k] for k in _KEPT_CONFIG_KEYS if k in config}
        tokenizer._sentencepiece_bytes = sentencepiece_bytes
        if rebuild_post_processor:
            tokenizer._set_post_processor(add_bos=add_bos, add_eos=add_eos)
        logger.debug("loaded tokenizer from %s (%d tokens)", root, tokenizer.vocab_size)
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

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update(self._named)
        if self._extra:
            config["additional_special_tokens"] = list(self._extra)
        decoder = self._backend.get_added_tokens_decoder()
        config["added_tokens_decoder"] = {
            str(index): {
                "content": token.content,
                "lstrip": token.lstrip,
                "normalized": token.normalized,
                "rstrip": token.rstrip,
                "single_word": token.single_word,
                "special": token.special,
            }
            for index, token in sorted(decoder.items())
        }
        config["clean_up_tokenization_spaces"] = self._clean_up
        if self._backend.encode_special_tokens:
            config["split_special_tokens"] = True
        config.update(self._kept_config)
        if self._chat_templates:
            if self._single_template and list(self._chat_templates) == ["default"]:
                config["chat_template"] = self._chat_templates["default"]
            else:
                templates = self._chat_templates.items()
                config["chat_template"] = [{"name": name, "template": text} for name, text in templates]
        return config

    def _files(self) -> dict[str, bytes]:
        special_map: dict[str, Any] = dict(self._named)
        if self._extra:
            special_map["additional_special_tokens"] = list(self._extra)
        files = {
            TOKENIZER_FILE: self._backend.to_str(pretty=True).encode("utf-8"),
            CONFIG_FILE: _json_bytes(self._config()),
            SPECIAL_TOKENS_MAP_FILE: _json_bytes(special_map),
        }
        if self._sentencepiece_bytes is not None:
            files[SENTENCEPIECE_FILE] = self._sentencepiece_bytes
        return files

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Writes the tokenizer as a Hugging Face tokenizer directory.

        Writes ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, added tokens and the chat
        template) and ``special_tokens_map.json`` (plus ``tokenizer.model`` for a tokenizer read from
        one); ``transformers.AutoTokenizer`` loads the result with identical encodes and chats. The
        files are written to a staging directory first and then moved into place, so a failure leaves
        an existing directory as it was. Other files in ``path`` (model weights ...) are kept; a stale
        ``chat_template.jinja`` or ``added_tokens.json``, which would override what is written, is
        removed.

        Args:
            path: The directory; created if missing.

        Raises:
            TokenizerError: The directory cannot be written (the original is left intact).
        """
        target = Path(path).absolute()
        if target.exists() and not target.is_dir():
            raise TokenizerError(
                f"cannot save the tokenizer to {str(target)!r}: it is a file, not a directory"
            )
        files = self._files()
        staging: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.parent / f".{target.name}.saving-{secrets.token_hex(6)}"
            os.mkdir(staging)  # default permissions (umask applies), unlike tempfile.mkdtemp's 0o700
            for name, data in files.items():
                with open(staging / name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            if not target.exists():
                os.rename(staging, target)  # one atomic step: the directory appears complete or not at all
                staging = None
            else:
                self._commit_into(staging, target, list(files))
        except _RestoreFailed as exc:
            kept, staging = staging, None  # it holds the only copy of the previous files
            raise TokenizerError(
                f"could not save the tokenizer to {str(target)!r}: {exc.__cause__}; restoring the previous "
                f"files then failed too ({exc}). They are kept in {kept}/.previous: move them back by hand."
            ) from exc
        except OSError as exc:
            raise TokenizerError(
                f"could not save the tokenizer to {str(target)!r}: {exc}. Nothing there was changed."
            ) from exc
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        logger.info("saved tokenizer to %s", target)

    @staticmethod
    def _commit_into(staging: Path, target: Path, names: list[str]) -> None:
        """Moves staged files into an existing directory, restoring every touched file on failure."""
        backup = staging / ".previous"
        backup.mkdir()
        replaced: list[str] = []
        created: list[str] = []
        removed: list[str] = []
        try:
            for name in names:
                if (target / name).exists():
                    # A hard link keeps the old file reachable without ever leaving the name missing.
                    try:
                        os.link(target / name, backup / name)
                    except OSError:
                        shutil.copy2(target / name, backup / name)
            for name in names:
                existed = (backup / name).exists()
                os.replace(staging / name, target / name)
                (replaced if existed else created).append(name)
            for name in _STALE_ON_SAVE:
                if (target / name).exists():
                    os.replace(target / name, backup / name)
                    removed.append(name)
                    logger.info("removed stale %s from %s (it would override the saved config)", name, target)
        except BaseException as exc:
            try:
                for name in created:
                    (target / name).unlink(missing_ok=True)
                for name in replaced + removed:
                    os.replace(backup / name, target / name)
            except OSError as restore_exc:
                raise _RestoreFailed(str(restore_exc)) from exc
            raise

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name_or_path={self._name_or_path!r}, vocab_size={self.vocab_size}, "
            f"model={type(self._backend.model).__name__}, special_tokens={self._named}, "
            f"chat_template={'yes' if self._chat_templates else 'no'})"
        )
