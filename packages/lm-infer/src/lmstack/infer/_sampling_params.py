"""Per-request sampling parameters, with vLLM's names and OpenAI's penalty semantics."""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmstack.infer._errors import InvalidRequestError

__all__ = ["GUIDED_FIELDS", "MAX_LOGPROBS", "MAX_N", "SamplingParams", "check_json_schema"]

# The constraint fields, vLLM's names; at most one may be set.
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")

# Most completions a single request may ask for (each one is a sequence in the batch).
MAX_N = 128
# Most top log-probs per token, as OpenAI's API and vLLM's default allow.
MAX_LOGPROBS = 20
# OpenAI's range for presence and frequency penalties.
_PENALTY_LIMIT = 2.0


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `n=True` is a caller's mistake, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(field: str, expected: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"{field} must be {expected}, got {value!r}", param=field)


def _check_int(field: str, value: Any, low: int | None, high: int | None, expected: str) -> int:
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        raise _invalid(field, expected, value)
    return int(value)


def _check_float(field: str, value: Any, expected: str, valid: Callable[[float], bool]) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _invalid(field, f"a finite number {expected}", value)
    if not valid(float(value)):
        raise _invalid(field, expected, value)
    return float(value)


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(field, "a bool", value)
    return value


@dataclass
class SamplingParams:
    """How to sample the completions of one request (vLLM's field names and defaults).

    The constructor validates every field and normalises ``stop`` and ``stop_token_ids`` to lists
    (``None`` becomes ``[]``, a single string a one-element list), so the engine can rely on them.
    Setting fields after construction bypasses validation.

    Attributes:
        n: Number of completions to generate for the prompt, 1 to 128.
        max_tokens: Most tokens to generate per completion (>= 1), or None to generate until the end
            of the model's context.
        min_tokens: Fewest tokens to generate before the end-of-sequence token or a ``stop_token_ids``
            token may be sampled (they are masked out until then), and before stop strings count.
        temperature: Softmax temperature, >= 0; 0 means greedy decoding (argmax).
        top_p: Nucleus sampling: keep the smallest set of most likely tokens whose probability
            reaches ``top_p``, in (0, 1]; 1 disables it.
        top_k: Keep only the ``top_k`` most likely tokens; -1 or 0 disables it.
        min_p: Drop tokens whose probability is below ``min_p`` times the most likely token's,
            in [0, 1]; 0 disables it.
        repetition_penalty: CTRL / Hugging Face style penalty (> 0) on every token seen in the prompt
            or the output: a positive logit is divided by it, a negative one multiplied. 1 disables it.
        presence_penalty: OpenAI style, in [-2, 2]: subtracted once from the logit of every token
            already in the output (the prompt does not count).
        frequency_penalty: OpenAI style, in [-2, 2]: subtracted from a token's logit once per time
            it already appears in the output (the prompt does not count).
        seed: Seed of this request's own random generator: the same seed gives the same completion
            whatever else is in the batch. None samples from the engine's shared generator.
        stop: Strings that end a completion when generated; the stop string itself is left out of
            the text unless ``include_stop_str_in_output``. Normalised to a list; no empty strings.
        stop_token_ids: Token ids that end a completion; their text is not part of the output.
        ignore_eos: Keep generating after the end-of-sequence token (it is then an ordinary token).
        logprobs: None for no log-probs; otherwise the log-prob of each sampled token is reported,
            together with the ``logprobs`` (0 to 20) most likely alternatives.
        skip_special_tokens: Leave special tokens out of the output text.
        include_stop_str_in_output: Keep the stop string that ended a completion in its text.
        guided_json: Constrain the output to JSON valid under this JSON schema (a dict, or its JSON
            text; ``{"type": "object"}`` for any object). Checked with ``jsonschema`` here; the
            grammar itself is compiled by the engine.
        guided_regex: Constrain the output to a full match of this regular expression.
        guided_choice: Constrain the output to exactly one of these strings.
        guided_grammar: Constrain the output to this grammar: GBNF (``root ::= ...``, llama.cpp's
            syntax, recognised by its ``::=``) or Lark (llguidance's dialect, ``start: ...``).
        guided_json_fit: Make ``guided_json`` output always complete within the token budget
            (``max_tokens``, else what the context leaves): the schema is tightened (caps on string
            lengths, array items, digits, the keys of free-form objects) so that every output the
            grammar allows is at most that many tokens, counting one byte per token, the worst case.
            Every output then parses and still validates against the schema as given, even from a
            model that knows no JSON, but the caps are small for small budgets (about 6 characters
            per string for a 7-field schema in 256 tokens). Off by default: an output cut by
            ``max_tokens`` then ends with ``finish_reason == "length"``, as OpenAI's API does.
            None (the default) means off, except for tool calls made under ``tool_choice``
            ``"required"`` or a named function, where it means on. Ignored without ``guided_json``.

    With a constraint, the end-of-sequence token can be sampled only where the constraint can end,
    and the completion stops as soon as nothing more can follow.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_json_fit: bool | None = None

    def __post_init__(self) -> None:
        self.n = _check_int("n", self.n, 1, MAX_N, f"an int in [1, {MAX_N}]")
        if self.max_tokens is not None:
            self.max_tokens = _check_int("max_tokens", self.max_tokens, 1, None, "None or an int >= 1")
        self.min_tokens = _check_int("min_tokens", self.min_tokens, 0, None, "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _invalid("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)

        # Messages quote the value as given (an int stays an int), so the caller recognises it.
        self.temperature = _check_float("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        self.top_p = _check_float("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        self.top_k = _check_int("top_k", self.top_k, -1, None, "-1, 0 (both disable it) or an int >= 1")
        self.min_p = _check_float("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        self.repetition_penalty = _check_float(
            "repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0
        )
        limit = f"in [-{_PENALTY_LIMIT:g}, {_PENALTY_LIMIT:g}]"
        self.presence_penalty = _check_float(
            "presence_penalty", self.presence_penalty, limit, lambda v: abs(v) <= _PENALTY_LIMIT
        )
        self.frequency_penalty = _check_float(
            "frequency_penalty", self.frequency_penalty, limit, lambda v: abs(v) <= _PENALTY_LIMIT
        )

        if self.seed is not None and not _is_int(self.seed):
            raise _invalid("seed", "None or an int", self.seed)
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        self.ignore_eos = _check_bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            self.logprobs = _check_int(
                "logprobs", self.logprobs, 0, MAX_LOGPROBS, f"None or an int in [0, {MAX_LOGPROBS}]"
            )
        self.skip_special_tokens = _check_bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _check_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )
        if self.guided_json_fit is not None:
            self.guided_json_fit = _check_bool("guided_json_fit", self.guided_json_fit)
        self._check_guided()

    def _check_guided(self) -> None:
        chosen = [name for name in GUIDED_FIELDS if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise InvalidRequestError(
                f"set at most one of {', '.join(GUIDED_FIELDS)}; got {' and '.join(chosen)}", param=chosen[1]
            )
        if self.guided_json is not None:
            self.guided_json = check_json_schema(self.guided_json)
        for name in ("guided_regex", "guided_grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _invalid(name, "None or a non-empty string", value)
        if self.guided_choice is not None:
            choices = self.guided_choice
            if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices:
                raise _invalid("guided_choice", "None or a non-empty list of strings", choices)
            for index, item in enumerate(choices):
                if not isinstance(item, str) or not item:
                    raise _invalid(f"guided_choice[{index}]", "a non-empty string", item)
            self.guided_choice = list(choices)
        if chosen and self.min_tokens:
            # A grammar decides where the output may end; a floor on its length could contradict it.
            raise InvalidRequestError(
                f"min_tokens cannot be combined with {chosen[0]}: the constraint decides where the output "
                "ends; drop min_tokens.",
                param="min_tokens",
            )

    @staticmethod
    def _normalise_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)):
            raise _invalid("stop", "None, a string or a list of strings", stop)
        for index, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise _invalid(f"stop[{index}]", "a non-empty string", item)
        return list(items)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise _invalid("stop_token_ids", "None or a list of ints", ids)
        for index, item in enumerate(ids):
            if not _is_int(item) or item < 0:
                raise _invalid(f"stop_token_ids[{index}]", "an int >= 0", item)
        return [int(item) for item in ids]

    @property
    def guided_kind(self) -> str | None:
        """Which ``guided_*`` field is set (``"guided_json"`` ...), or None for free decoding."""
        for name in GUIDED_FIELDS:
            if getattr(self, name) is not None:
                return name
        return None

    @property
    def greedy(self) -> bool:
        """Whether sampling is deterministic argmax (``temperature == 0`` or ``top_k == 1``)."""
        return self.temperature == 0 or self.top_k == 1

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Checks the token ids in these parameters against a model's vocabulary.

        Args:
            vocab_size: Number of token ids the model produces (its logits' width).

        Raises:
            InvalidRequestError: A ``stop_token_ids`` entry is not in ``[0, vocab_size)``.
        """
        for index, token_id in enumerate(self.stop_token_ids or ()):
            if not 0 <= token_id < vocab_size:
                raise _invalid(f"stop_token_ids[{index}]", f"a token id in [0, {vocab_size})", token_id)


# Schemas that passed the meta-schema check (canonical JSON text): the check takes milliseconds
# (jsonschema walks the 2020-12 meta-schema's dynamic refs) and clients send the same schemas and
# tools with every request.
_checked: OrderedDict[str, None] = OrderedDict()
_checked_lock = threading.Lock()
_CHECKED_SIZE = 512


def check_json_schema(value: Any, what: str = "guided_json", param: str = "guided_json") -> dict[str, Any]:
    """``value`` as a JSON schema dict, checked against its JSON Schema meta-schema (default 2020-12).

    Args:
        value: A schema dict, its JSON text, or ``true``/``false`` (any value / none).
        what: How error messages name the value.
        param: The request field an error blames.

    Returns:
        The schema (a dict; JSON text parsed; booleans as their dict forms).

    Raises:
        InvalidRequestError: ``value`` is not JSON, not an object, or not a valid schema.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequestError(f"{what} is not valid JSON: {exc}", param=param) from None
    if isinstance(value, bool):  # `true` allows any JSON value, `false` none: both are schemas
        value = {} if value else {"not": {}}
    if not isinstance(value, dict):
        raise _invalid(param, f"a JSON schema (an object, or its JSON text) for {what}", value)
    key = json.dumps(value, sort_keys=True, default=repr)
    with _checked_lock:
        if key in _checked:
            _checked.move_to_end(key)
            return value
    import jsonschema  # imported here: only constrained requests need it

    try:
        validator = jsonschema.validators.validator_for(value, default=jsonschema.Draft202012Validator)
        validator.check_schema(value)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise InvalidRequestError(
            f"{what} is not a valid JSON schema: {exc.message}" + (f" (at {where})" if where else ""),
            param=param,
        ) from None
    with _checked_lock:
        _checked[key] = None
        if len(_checked) > _CHECKED_SIZE:
            _checked.popitem(last=False)
    return value
