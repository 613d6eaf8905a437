"""Building blocks for implementing :class:`~lmstack.infer.LLMProtocol` the way lmstack's own models do.

:class:`~lmstack.infer.LLM` and :class:`~lmstack.infer.RemoteLLM` share these, and another
implementation (lmstack-eval's transformers reference model, an adapter for another engine) should
use them too, so that every implementation reads its inputs, splits context from continuation, cuts
rolling windows and applies stop conditions identically, and only the model arithmetic differs.

* :func:`as_batch`, :func:`as_params`, :func:`as_conversations`, :func:`is_conversation`: normalise
  the protocol's prompt, sampling-parameter and message arguments (one or many).
* :func:`check_token_ids`, :func:`check_max_length`: validate token-id prompts and rolling windows.
* :func:`split_pair`: a ``(context, continuation)`` pair as token ids, split as lm-evaluation-harness
  splits it.
* :func:`rolling_token_lists`, :func:`plan_rolling`, :func:`sum_rolling`: the token lists, windows and
  per-text sums of ``loglikelihood_rolling``.
* :class:`IncrementalDetokenizer`: streaming detokenization with stop strings, stop token ids and EOS.
"""

from lmstack.infer._inputs import (
    Message,
    Prompt,
    as_batch,
    as_conversations,
    as_params,
    check_max_length,
    check_token_ids,
    is_conversation,
    plan_rolling,
    rolling_token_lists,
    sum_rolling,
)
from lmstack.infer._protocol import LLMProtocol
from lmstack.infer._scoring import split_pair
from lmstack.infer.engine._detokenizer import IncrementalDetokenizer

__all__ = [
    "IncrementalDetokenizer",
    "LLMProtocol",
    "Message",
    "Prompt",
    "as_batch",
    "as_conversations",
    "as_params",
    "check_max_length",
    "check_token_ids",
    "is_conversation",
    "plan_rolling",
    "rolling_token_lists",
    "split_pair",
    "sum_rolling",
]
