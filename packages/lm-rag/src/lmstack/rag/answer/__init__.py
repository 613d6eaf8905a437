"""Answers from retrieved passages: the :class:`Assistant`, its answers and citation handling."""

from lmstack.rag.answer._assistant import (
    DEFAULT_INSTRUCTION,
    DEFAULT_REFUSAL,
    Answer,
    AnswerEvent,
    Assistant,
    Citation,
)
from lmstack.rag.answer._citations import CitationFilter, cited_numbers, clean_citations

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_REFUSAL",
    "Answer",
    "AnswerEvent",
    "Assistant",
    "Citation",
    "CitationFilter",
    "cited_numbers",
    "clean_citations",
]
