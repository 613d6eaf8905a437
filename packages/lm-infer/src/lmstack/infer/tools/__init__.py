"""Tool calling and JSON replies for chat: OpenAI's ``tools``, ``tool_choice`` and ``response_format``.

:func:`plan_chat` turns a chat request into a :class:`ChatPlan`: the prompt (the conversation,
tools and earlier tool calls rendered by the model's chat template), the sampling parameters with
the constraint the request implies, and how to read the replies (:meth:`ChatPlan.parse` for a
whole reply, :meth:`ChatPlan.streamer` while it streams)::

    plan = plan_chat(tokenizer, messages, SamplingParams(max_tokens=256), tools=tools,
                     tool_choice="required")
    # generate from plan.prompt_ids with plan.params, then:
    reply = plan.parse(text)          # reply.content, reply.tool_calls

What each request asks for (OpenAI's semantics):

* ``response_format`` ``{"type": "json_object"}``: the reply is a JSON object (``guided_json``
  ``{"type": "object"}``); ``{"type": "json_schema", "json_schema": {"schema": ..., "strict": true}}``:
  JSON valid under the schema. With ``strict``, object schemas that list ``properties`` and say
  nothing of ``additionalProperties`` get ``additionalProperties: false``, as OpenAI's strict mode
  never adds keys.
* ``tool_choice="none"``: the tools are rendered (the model knows them) but the reply is text.
* ``"auto"`` (the default with tools): the model writes freely and a :class:`ToolParser` finds
  the calls in its format. With ``parallel_tool_calls=False`` only the first call is kept.
* ``"required"``: the reply is generated under a grammar as a JSON array of
  ``{"name": ..., "arguments": ...}`` calls (one at most without ``parallel_tool_calls``), each
  valid for its tool's parameter schema, so even a weak model makes a valid call.
* ``{"type": "function", "function": {"name": N}}``: the whole reply is N's arguments, generated
  under N's parameter schema.

The parsers (``--tool-call-parser``, else recognised from the chat template by
:func:`detect_tool_parser`, else ``hermes``):

* ``hermes``: Hermes and Qwen2/2.5/3, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
* ``internlm2``: ``<|action_start|><|plugin|>{"name": ..., "parameters": {...}}<|action_end|>``
  (special tokens: the engine decodes with ``skip_special_tokens=False``).
* ``llama3_json``: Llama 3.1/3.2, the reply is ``{"name": ..., "parameters": {...}}`` (maybe after
  ``<|python_tag|>``, several separated by ``;``).
* ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`` or ``[TOOL_CALLS]name[ARGS]{...}``.

A reply's content is the text outside its calls, stripped at both ends (None when empty). A call
marker that never completes, or a call whose JSON does not parse, has no name, or whose arguments
are not an object, stays in the content: nothing is lost and nothing raises. While streaming,
content goes out as it comes, except text that may still be a call marker (held until decided);
an ``auto`` call goes out whole when it closes, a ``required`` call when its object closes, and a
named call's arguments stream from the first token. For the same text, a stream gives out what the
whole-reply parse finds, however the text is cut into pieces (for ``required`` and named calls:
for a complete reply; a reply cut short by ``max_tokens`` keeps what was already streamed, while
:meth:`ChatPlan.parse` gives such a reply back as content).
"""

from lmstack.infer.tools._base import (
    ParsedReply,
    ReplyDelta,
    ReplyStreamer,
    ToolCallDelta,
    ToolParser,
    new_tool_call_id,
)
from lmstack.infer.tools._chat import ChatMode, ChatPlan, plan_chat
from lmstack.infer.tools._choice import check_tools
from lmstack.infer.tools._parsers import TOOL_PARSERS, detect_tool_parser, get_tool_parser

__all__ = [
    "TOOL_PARSERS",
    "ChatMode",
    "ChatPlan",
    "ParsedReply",
    "ReplyDelta",
    "ReplyStreamer",
    "ToolCallDelta",
    "ToolParser",
    "check_tools",
    "detect_tool_parser",
    "get_tool_parser",
    "new_tool_call_id",
    "plan_chat",
]
