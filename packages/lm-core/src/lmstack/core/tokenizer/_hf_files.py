"""Reading and writing Hugging Face tokenizer directories.

:func:`read_tokenizer_dir` reads what ``transformers.AutoTokenizer`` reads from a directory
(``tokenizer.json`` or a SentencePiece ``tokenizer.model``, ``tokenizer_config.json``, the legacy
``special_tokens_map.json`` and ``added_tokens.json``, chat template files) into lmstack's terms;
:func:`tokenizer_files` renders a tokenizer back into those files and :func:`write_tokenizer_dir`
puts them in place atomically. :class:`~lmstack.core.tokenizer.Tokenizer` keeps the API and calls these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from lmstack.core._atomic import atomic_directory
from lmstack.core._errors import TokenizerError

__all__ = [
    "NAMED_SPECIAL_TOKENS",
    "TokenSpec",
    "TokenizerDir",
    "read_tokenizer_dir",
    "token_content",
    "tokenizer_files",
    "write_tokenizer_dir",
]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SENTENCEPIECE_FILE = "tokenizer.model"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
ADDED_TOKENS_FILE = "added_tokens.json"

# The named special tokens, in the order Hugging Face lists them.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# tokenizer_config.json keys carried over unchanged by a save (all harmless to transformers).
_KEPT_CONFIG_KEYS = ("model_max_length", "padding_side", "truncation_side", "model_input_names")
# Files a save drops from an existing directory because they would override what it writes.
_STALE_ON_SAVE = (CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR, ADDED_TOKENS_FILE)

TokenSpec = str | AddedToken


# -- reading -----------------------------------------------------------------------------------------


def token_content(token: TokenSpec) -> str:
    """The text of a special token, however it is given."""
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
            token_content(spec)
            for k in NAMED_SPECIAL_TOKENS
            if (spec := _token_spec(config.get(k), str(config_path)))
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
        if key in NAMED_SPECIAL_TOKENS or (key.endswith("_token") and isinstance(value, (str, Mapping))):
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
        if value is not None and token_content(value) in by_content:
            named[key] = by_content[token_content(value)]
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


@dataclass
class TokenizerDir:
    """What a Hugging Face tokenizer directory holds, in the terms :class:`Tokenizer` is built from.

    Attributes:
        root: The directory.
        config: tokenizer_config.json (legacy special_tokens_map.json entries merged in), or ``{}``.
        backend: The Rust tokenizer (a SentencePiece model converted to one), added tokens included.
        chat_template: One template, templates by name, or None.
        special_tokens: The named special tokens (``bos_token`` ... and model-specific ones).
        additional_special_tokens: Further special tokens, as listed in the config.
        sentencepiece_bytes: The ``tokenizer.model`` file when the tokenizer came from one.
        post_processor: ``(add_bos, add_eos)`` when the backend's post-processor must be (re)built
            from the config, None when the backend's own stands.
    """

    root: Path
    config: dict[str, Any]
    backend: RustTokenizer
    chat_template: str | dict[str, str] | None
    special_tokens: dict[str, TokenSpec | None]
    additional_special_tokens: list[TokenSpec]
    sentencepiece_bytes: bytes | None
    post_processor: tuple[bool, bool] | None

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        """The config's decode clean-up flag."""
        return bool(self.config.get("clean_up_tokenization_spaces", False))

    @property
    def kept_config(self) -> dict[str, Any]:
        """tokenizer_config.json keys a save writes back unchanged."""
        return {k: self.config[k] for k in _KEPT_CONFIG_KEYS if k in self.config}


def read_tokenizer_dir(path: str | os.PathLike[str]) -> TokenizerDir:
    """Read a local Hugging Face tokenizer (or model) directory as ``transformers`` would.

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
            extra = [AddedToken(p, normalized=False, special=True) for p in control_pieces(model, renames)]
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

    return TokenizerDir(
        root=root,
        config=config,
        backend=backend,
        chat_template=_read_chat_templates(root, config, str(config_path)),
        special_tokens=named,
        additional_special_tokens=extra,
        sentencepiece_bytes=sentencepiece_bytes,
        post_processor=(add_bos, add_eos) if rebuild_post_processor else None,
    )


# -- writing -----------------------------------------------------------------------------------------


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def tokenizer_files(
    backend: RustTokenizer,
    *,
    special_tokens: Mapping[str, str],
    additional_special_tokens: Sequence[str],
    chat_templates: Mapping[str, str],
    single_template: bool,
    clean_up_tokenization_spaces: bool,
    kept_config: Mapping[str, Any],
    sentencepiece_bytes: bytes | None,
) -> dict[str, bytes]:
    """The files of a Hugging Face tokenizer directory, by name, for a tokenizer made of these parts.

    ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, added tokens, chat templates),
    ``special_tokens_map.json``, and ``tokenizer.model`` when ``sentencepiece_bytes`` are given.
    ``single_template`` writes a lone ``default`` template as a string rather than a named list.
    """
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update(special_tokens)
    if additional_special_tokens:
        config["additional_special_tokens"] = list(additional_special_tokens)
    decoder = backend.get_added_tokens_decoder()
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
    config["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
    if backend.encode_special_tokens:
        config["split_special_tokens"] = True
    config.update(kept_config)
    if chat_templates:
        if single_template and list(chat_templates) == ["default"]:
            config["chat_template"] = chat_templates["default"]
        else:
            templates = chat_templates.items()
            config["chat_template"] = [{"name": name, "template": text} for name, text in templates]
    special_map: dict[str, Any] = dict(special_tokens)
    if additional_special_tokens:
        special_map["additional_special_tokens"] = list(additional_special_tokens)
    files = {
        TOKENIZER_FILE: backend.to_str(pretty=True).encode("utf-8"),
        CONFIG_FILE: _json_bytes(config),
        SPECIAL_TOKENS_MAP_FILE: _json_bytes(special_map),
    }
    if sentencepiece_bytes is not None:
        files[SENTENCEPIECE_FILE] = sentencepiece_bytes
    return files


def write_tokenizer_dir(path: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """Put ``files`` into the directory ``path`` in one atomic step (see :func:`atomic_directory`).

    The directory's other files (model weights, a README, a ``tokenizer.model`` that is not being
    rewritten) are kept; a stale ``chat_template.jinja``, ``additional_chat_templates/`` or
    ``added_tokens.json``, which would override the written config, is dropped.

    Raises:
        TokenizerError: ``path`` is a file, or the directory cannot be written (then it is unchanged).
    """
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise TokenizerError(f"cannot save the tokenizer to {str(target)!r}: it is a file, not a directory")
    replaced = {*files, *_STALE_ON_SAVE}
    try:
        with atomic_directory(target, keep=lambda name: name not in replaced) as staging:
            for name, data in files.items():
                (staging / name).write_bytes(data)
    except OSError as exc:
        raise TokenizerError(
            f"could not save the tokenizer to {str(target)!r}: {exc}. Nothing there was changed."
        ) from exc
    return target
