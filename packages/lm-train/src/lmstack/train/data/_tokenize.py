"""Samples to token ids and loss masks, through the model's own chat template.

A conversation is rendered once with the tokenizer's chat template (``apply_chat_template(...,
tokenize=False)``) and tokenized once, with character offsets, by the Rust tokenizer (batched). Which
tokens carry the loss is decided by character spans:

* ``train_on="assistant"``: for each assistant turn ``i``, the span runs from the end of
  ``render(messages[:i], add_generation_prompt=True)`` (the prompt up to and including the assistant
  header) to the end of ``render(messages[:i + 1])`` (the turn with its end-of-turn token, such as
  ``<|im_end|>`` or ``<|eot_id|>``), minus the whitespace the template writes between turns. A token
  is trained on when its characters overlap a span, so the model learns the reply and where it stops,
  and never the prompt, the role headers or the other turns.
* ``train_on="all"``: every token.

**The assumption this rests on**: the template renders a prefix of a conversation as a prefix of the
rendering of the whole conversation (true of ChatML, Llama 3, Mistral, Gemma and most templates). It is
checked for every sample; a template that breaks it (for example one that renders the last assistant
turn differently from earlier ones, as some reasoning templates do) raises :class:`ChatTemplateError`
naming the turn and the first differing characters, instead of silently mis-masking. A template that
ignores ``add_generation_prompt`` is handled by locating the reply's text inside the turn.

A text document becomes ``[bos] + ids + [eos]`` (bos when the tokenizer has one, eos with
``add_eos``), all trained on.

Labels convention (the whole package): labels are **not shifted**: ``labels[t]`` is the target for the
logits at ``t - 1`` (as in Hugging Face ``transformers``), and the first token of every sample never
carries a loss (its label is -100).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from lmstack.core import LMStackError, Tokenizer
from lmstack.train.data._errors import DataError
from lmstack.train.data._formats import Sample, content_text

logger = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "ChatTemplateError", "RenderedSample", "SampleTokenizer", "TokenizedSample"]

IGNORE_INDEX = -100
"""The label of a token that carries no loss (``ignore_index`` of ``torch.nn.functional.cross_entropy``)."""


class ChatTemplateError(DataError):
    """The chat template cannot be used to find the assistant turns (it is not prefix-stable).

    This is a problem of the template, not of one record, so it is never skipped.
    """


@dataclass
class TokenizedSample:
    """A sample's token ids and which of them carry the loss.

    Attributes:
        input_ids: Token ids, ``int32``.
        loss_mask: ``True`` where the token is a training target; the first token is always False.
        is_chat: Whether the sample was a conversation (else a text document).
    """

    input_ids: NDArray[np.int32]
    loss_mask: NDArray[np.bool_]
    is_chat: bool = True

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def labels(self) -> NDArray[np.int64]:
        """Unshifted labels: the token id where it is trained on, else -100."""
        return np.where(self.loss_mask, self.input_ids.astype(np.int64), IGNORE_INDEX)


@dataclass
class RenderedSample:
    """A sample rendered to text, with the character spans that carry the loss.

    Attributes:
        text: The rendered conversation, or the document.
        spans: ``(start, end)`` character ranges to train on (chats only).
        is_chat: Whether it is a conversation.
    """

    text: str
    spans: list[tuple[int, int]]
    is_chat: bool


def _difference(a: str, b: str) -> str:
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"at character {k}: {a[max(0, k - 20) : k + 40]!r} vs {b[max(0, k - 20) : k + 40]!r}"


class SampleTokenizer:
    """Turns :class:`Sample` objects into token ids and loss masks (see the module docs).

    Args:
        tokenizer: The model's tokenizer (its chat template is used).
        train_on: ``assistant`` (loss on the assistant turns) or ``all``.
        add_eos: End text documents with the eos token.
        chat_template: A template name among the tokenizer's, or a template's text; None for its
            default.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        train_on: Literal["assistant", "all"] = "assistant",
        add_eos: bool = True,
        chat_template: str | None = None,
    ) -> None:
        if train_on not in ("assistant", "all"):
            raise DataError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.add_eos = add_eos
        self.chat_template = chat_template
        self._backend = tokenizer.backend_tokenizer
        self._bos = tokenizer.bos_token_id
        self._eos = tokenizer.eos_token_id
        self._generation_prompt: bool | None = None
        if add_eos and self._eos is None:
            logger.warning("the tokenizer has no eos token: text documents get no end-of-sequence token")

    # -- rendering ---------------------------------------------------------------------------------

    def _render(self, messages: Sequence[Mapping[str, Any]], generation: bool, tools: Any) -> str:
        text = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=generation,
            tokenize=False,
            tools=tools,
            chat_template=self.chat_template,
        )
        assert isinstance(text, str)
        return text

    def _supports_generation_prompt(self) -> bool:
        if self._generation_prompt is None:
            probe = [{"role": "user", "content": "hello"}]
            try:
                with_prompt = self._render(probe, True, None)
                without = self._render(probe, False, None)
                self._generation_prompt = with_prompt != without
            except LMStackError:
                self._generation_prompt = True  # the template refuses the probe; assume the usual
            if not self._generation_prompt:
                logger.warning(
                    "the chat template ignores add_generation_prompt: assistant replies are located by "
                    "their text inside each turn"
                )
        return self._generation_prompt

    def render(self, sample: Sample) -> RenderedSample:
        """Renders a sample to text and finds the character spans to train on.

        Args:
            sample: A conversation or a text document.

        Returns:
            The rendered text and its loss spans.

        Raises:
            ChatTemplateError: The template is not prefix-stable on this conversation.
            DataError: The template refuses the conversation (for example a template that demands
                alternating user and assistant turns).
        """
        if not sample.is_chat:
            return RenderedSample(text=sample.text or "", spans=[], is_chat=False)
        messages = sample.messages or []
        tools = sample.tools
        try:
            full = self._render(messages, False, tools)
            if self.train_on == "all":
                return RenderedSample(text=full, spans=[(0, len(full))], is_chat=True)
            spans: list[tuple[int, int]] = []
            previous_end = 0
            for i, message in enumerate(messages):
                if message.get("role") != "assistant":
                    continue
                # The last turn's rendering is the full text (conversations end with the assistant).
                through = full if i == len(messages) - 1 else self._render(messages[: i + 1], False, tools)
                if not full.startswith(through):
                    raise self._unstable(sample, i, "the conversation up to this turn", through, full)
                end = len(through)
                if i > 0 and self._supports_generation_prompt():
                    before = self._render(messages[:i], True, tools)
                    if not through.startswith(before):
                        raise self._unstable(
                            sample, i, "the turns before it plus the generation prompt", before, through
                        )
                    start = len(before)
                else:
                    start = self._locate_reply(sample, i, full, previous_end, end)
                while end > start and full[end - 1].isspace():
                    end -= 1  # the separator the template writes after the end-of-turn token
                if end > start:
                    spans.append((start, end))
                previous_end = len(through)
        except LMStackError as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(
                f"the chat template refused the conversation: {exc}", source=sample.source, line=sample.line
            ) from exc
        return RenderedSample(text=full, spans=spans, is_chat=True)

    def _locate_reply(self, sample: Sample, i: int, full: str, lo: int, hi: int) -> int:
        """Where assistant turn ``i``'s text starts in ``full[lo:hi]`` (templates without a prompt)."""
        messages = sample.messages or []
        content = content_text(messages[i].get("content"))
        for needle in (content, content.strip()):
            if needle:
                found = full.rfind(needle, lo, hi)
                if found >= 0:
                    return found
        if not content.strip():
            return lo  # a tool-call-only turn: train on the whole rendered turn
        raise ChatTemplateError(
            f"cannot find the text of assistant turn {i} in the rendered conversation: the chat template "
            "changes the reply's text and ignores add_generation_prompt, so the reply cannot be located. "
            "Use a template that supports add_generation_prompt (data.chat_template) or data.train_on=all.",
            source=sample.source,
            line=sample.line,
        )

    @staticmethod
    def _unstable(sample: Sample, i: int, what: str, part: str, whole: str) -> ChatTemplateError:
        return ChatTemplateError(
            f"the chat template is not prefix-stable: rendering {what} (assistant turn at message {i}) is "
            f"not a prefix of the longer rendering ({_difference(part, whole)}). The loss mask is found "
            "by rendering each prefix of the conversation, which needs a template whose output for the "
            "first turns does not change when turns are added. Use another template (data.chat_template) "
            "or data.train_on=all.",
            source=sample.source,
            line=sample.line,
        )

    # -- encoding ----------------------------------------------------------------------------------

    def encode(self, rendered: Sequence[RenderedSample]) -> list[TokenizedSample]:
        """Tokenizes rendered samples in one batched call of the Rust tokenizer.

        Args:
            rendered: Outputs of :meth:`render`.

        Returns:
            One tokenized sample each.
        """
        if not rendered:
            return []
        encodings = self._backend.encode_batch([r.text for r in rendered], add_special_tokens=False)
        out: list[TokenizedSample] = []
        for item, encoding in zip(rendered, encodings, strict=True):
            ids = np.asarray(encoding.ids, dtype=np.int32)
            if item.is_chat:
                mask = np.zeros(ids.shape[0], dtype=np.bool_)
                if item.spans and ids.shape[0]:
                    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
                    for start, end in item.spans:
                        mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
            else:
                head = [self._bos] if self._bos is not None else []
                tail = [self._eos] if self.add_eos and self._eos is not None else []
                ids = np.concatenate(
                    [np.asarray(head, dtype=np.int32), ids, np.asarray(tail, dtype=np.int32)]
                )
                mask = np.ones(ids.shape[0], dtype=np.bool_)
            if mask.shape[0]:
                mask[0] = False
            out.append(TokenizedSample(input_ids=ids, loss_mask=mask, is_chat=item.is_chat))
        return out

    def __call__(self, samples: Sequence[Sample]) -> list[TokenizedSample]:
        """Renders and tokenizes samples (errors raise; see :meth:`render`).

        Args:
            samples: The samples.

        Returns:
            One tokenized sample each.
        """
        return self.encode([self.render(sample) for sample in samples])
