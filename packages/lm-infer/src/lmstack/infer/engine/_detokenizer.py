"""Streaming detokenization of one completion, with stop strings and stop tokens.

Semantics of :class:`IncrementalDetokenizer` (what a streaming client sees):

* **Text.** Token ids are turned into text incrementally; the emitted pieces concatenate to
  ``tokenizer.decode(output_ids, skip_special_tokens=...)`` (stop tokens excluded, the text cut as
  below). A character split over several byte-level tokens is emitted once complete, so a piece
  never ends in a half character's replacement character (U+FFFD); invalid bytes still pending at
  the end are flushed by :meth:`~IncrementalDetokenizer.finish` as ``decode`` would render them.
* **Stop strings** are matched on the output text (not the prompt), across token boundaries. The
  completion ends at the first occurrence, meaning the one that ends first in the text (ties: the
  one starting first); this does not depend on how the text was split into tokens. The emitted
  text stops right before the stop string, or right after it with
  ``include_stop_str_in_output``; anything after it, even in the same token, is dropped. Text that
  could still be the beginning of a stop string is held back until it cannot be, so a stop
  string's prefix is never streamed and then retracted.
* **Stop tokens**: a ``stop_token_ids`` token, or the end-of-sequence token unless ``ignore_eos``,
  ends the completion; its own text is never emitted, and held-back text is flushed.
  ``stop_reason`` is the stop string or the ``stop_token_ids`` id that ended the completion, and
  None when it ended on end-of-sequence (as in vLLM and OpenAI's ``stop_reason``) or did not stop.
* ``min_tokens``: while fewer than ``min_tokens`` tokens (this one included) have been pushed,
  stop strings and stop tokens do not count (the sampler keeps stop tokens from being sampled
  then); a stop string that *ends* in a later token counts even if it began earlier.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmstack.core import Tokenizer
from lmstack.infer._errors import InferError
from lmstack.infer._sampling_params import SamplingParams

__all__ = ["IncrementalDetokenizer"]

# Prompt tokens decoded ahead of the output, so that the first output token is decoded in context
# (sentencepiece drops a word's leading space at the very start of a decode).
_PROMPT_CONTEXT = 5
# Ids before the decode window are dropped once this many pile up, keeping memory O(window).
_TRIM_AT = 256
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one completion's tokens into streamed text, applying its stop conditions.

    Call :meth:`push` with each generated token and send what it returns; when the completion ends
    without stopping (length limit, abort), call :meth:`finish` for the held-back rest. See the
    module docstring for the exact semantics.

    Each push decodes only a small window of ids (the tokens since the last emitted piece plus the
    piece before it, for context) twice, comparing the two decodes ("prefix" and "read" offsets),
    so the cost per token does not grow with the length of the completion.

    Args:
        tokenizer: The model's tokenizer.
        prompt_ids: The prompt's token ids (its last few give the first output token context).
        params: The request's sampling parameters (stop strings, stop token ids, ``ignore_eos``,
            ``min_tokens``, ``skip_special_tokens``, ``include_stop_str_in_output``).
        eos_token_ids: The end-of-sequence ids; the tokenizer's ``eos_token_id`` by default. Pass
            the model's generation config's list when it has several.

    Attributes:
        stopped: A stop string or stop token ended the completion.
        stop_reason: The stop string (str) or ``stop_token_ids`` id (int) that ended it; None when
            it ended on end-of-sequence or has not stopped.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        stop = params.stop
        self._stops: list[str] = [stop] if isinstance(stop, str) else list(stop or ())
        self._stop_ids = frozenset(params.stop_token_ids or ())
        if eos_token_ids is None:
            eos_id = tokenizer.eos_token_id
            eos_token_ids = () if eos_id is None else (eos_id,)
        self._eos_ids = frozenset() if params.ignore_eos else frozenset(eos_token_ids)

        self._ids: list[int] = [int(i) for i in prompt_ids[max(len(prompt_ids) - _PROMPT_CONTEXT, 0) :]]
        self._prefix_offset = 0  # start of the decode window (context already emitted)
        self._read_offset = len(self._ids)  # first id whose text has not been decoded yet
        self._pending = ""  # decoded text held back (a possible stop-string start)
        self._chunks: list[str] = []
        self._num_tokens = 0
        self._done = False
        self.stopped = False
        self.stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        """All output text emitted so far.

        The emitted pieces are kept in a list and joined here, on demand (the engine reads it once
        per output it hands back), never concatenated piece by piece; the join is kept until the
        next piece.
        """
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def num_tokens(self) -> int:
        """Number of tokens pushed, the stop token included."""
        return self._num_tokens

    @property
    def done(self) -> bool:
        """The completion stopped or :meth:`finish` was called: no more tokens may be pushed."""
        return self._done

    def push(self, token_id: int) -> str:
        """Adds one generated token.

        Args:
            token_id: The token.

        Returns:
            The new text that is safe to stream now (possibly empty). When this token ends the
            completion, :attr:`stopped` is set and the text is final.

        Raises:
            InferError: The completion already stopped or was finished.
        """
        if self._done:
            raise InferError("push() after the completion ended (it stopped or finish() was called)")
        self._num_tokens += 1
        counts = self._num_tokens >= self._min_tokens
        if counts and (token_id in self._stop_ids or token_id in self._eos_ids):
            out = self._drain(final=True)
            if not self.stopped:  # a stop string in the flushed text would have come first
                self.stopped = True
                self.stop_reason = token_id if token_id in self._stop_ids else None
            return out
        self._ids.append(int(token_id))
        return self._drain(final=False)

    def finish(self) -> str:
        """Ends the completion without a stop (length limit, abort) and flushes held-back text.

        Returns:
            The rest of the text; empty when the completion had already ended.
        """
        if self._done:
            return ""
        return self._drain(final=True)

    # ------------------------------------------------------------------------------------------

    def _decode_new(self, final: bool) -> str:
        """Returns the text the ids since the read offset add, and moves the offsets past them."""
        if self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        context = self._tokenizer.decode(
            window[: self._read_offset - self._prefix_offset], skip_special_tokens=self._skip_special
        )
        full = self._tokenizer.decode(window, skip_special_tokens=self._skip_special)
        # A trailing U+FFFD is (usually) a character whose remaining bytes are in tokens to come.
        if len(full) <= len(context) or (full.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset >= _TRIM_AT:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return full[len(context) :]

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _holdback(self, text: str) -> int:
        """Length of the longest end of ``text`` that a stop string starts with (but is not)."""
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), hold, -1):
                if stop.startswith(text[len(text) - size :]):
                    hold = size
                    break
        return hold

    def _drain(self, final: bool) -> str:
        pending = self._pending + self._decode_new(final)
        hit = self._first_stop(pending) if self._stops and self._num_tokens >= self._min_tokens else None
        if hit is not None:
            start, stop = hit
            out = pending[: start + len(stop) if self._include_stop else start]
            pending = ""
            self.stopped = True
            self.stop_reason = stop
            final = True
        else:
            # Everything a stop string could still complete stays in `pending`; by induction no
            # stop string ever starts in text already emitted, so searching `pending` suffices.
            keep = 0 if final else self._holdback(pending)
            out, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._pending = pending
        self._done = final
        if out:
            self._chunks.append(out)
        return out
