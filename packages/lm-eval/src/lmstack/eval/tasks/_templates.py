"""Turning a document into text with a field name or a jinja2 template, as lm-evaluation-harness does.

Templates render in a sandboxed jinja2 environment with ``StrictUndefined`` (a missing field is an
error naming the field, the template and the document, never an empty string), keep their trailing
newline, and have lm-eval's ``regex_replace`` filter.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Collection, Mapping
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from lmstack.eval._errors import TemplateError

__all__ = ["DocRenderer"]

_MISSING_NAME = re.compile(r"'([^']+)' is undefined|has no attribute '([^']+)'")


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    """``re.sub`` as a filter (lm-eval templates use it)."""
    return re.sub(pattern, repl, string, count=count)


def _which(doc_id: int | None) -> str:
    return "a few-shot example" if doc_id is None else f"doc {doc_id}"


def _describe(doc: Mapping[str, Any]) -> str:
    text = json.dumps(doc, ensure_ascii=False, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


class DocRenderer:
    """Renders templates and resolves field names against one task's documents.

    Args:
        features: The column names of the evaluated split; a spec equal to one of them is that field
            (lm-eval decides by the evaluated split's columns, not by each document's keys).
        has_choices: Whether the task has ``doc_to_choice``: then digits rendered by ``doc_to_text`` or
            ``doc_to_target`` are an index.
    """

    def __init__(self, features: Collection[str], *, has_choices: bool) -> None:
        self.features = frozenset(features)
        self.has_choices = has_choices
        self._env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        self._env.filters["regex_replace"] = _regex_replace
        self._compiled: dict[str, jinja2.Template] = {}

    def render(self, template: str, doc: Mapping[str, Any], *, doc_id: int | None, what: str) -> str:
        """Render ``template`` with the document's fields.

        Raises:
            TemplateError: The template names a field the document lacks, or does not render.
        """
        try:
            compiled = self._compiled.get(template)
            if compiled is None:
                compiled = self._compiled[template] = self._env.from_string(template)
            return compiled.render(**doc)
        except jinja2.UndefinedError as err:
            match = _MISSING_NAME.search(str(err))
            name = (match.group(1) or match.group(2)) if match else None
            fields = ", ".join(sorted(doc)) or "none"
            raise TemplateError(
                f"{what} template {template!r} uses {name or 'a value'!r}, which {_which(doc_id)} does not "
                f"have (its fields: {fields}); doc: {_describe(doc)}",
                field=name,
                template=template,
                doc_id=doc_id,
            ) from err
        except jinja2.TemplateError as err:
            raise TemplateError(
                f"{what} template {template!r} failed on {_which(doc_id)}: {err}",
                field=None,
                template=template,
                doc_id=doc_id,
            ) from err

    def text(self, spec: str, doc: Mapping[str, Any], *, doc_id: int | None) -> str | int:
        """``doc_to_text``: a field's value or the rendered template (digits: an index into the choices)."""
        if spec in self.features:
            return doc[spec]  # type: ignore[no-any-return]
        rendered = self.render(spec, doc, doc_id=doc_id, what="doc_to_text")
        return int(rendered) if rendered.isdigit() and self.has_choices else rendered

    def target(self, spec: str, doc: Mapping[str, Any], *, doc_id: int | None) -> str | int | list[Any]:
        """``doc_to_target``: a field's value, an index, a list literal, or the rendered string."""
        if spec in self.features:
            return doc[spec]  # type: ignore[no-any-return]
        rendered = self.render(spec, doc, doc_id=doc_id, what="doc_to_target")
        if rendered.isdigit() and self.has_choices:
            return int(rendered)
        if len(rendered) >= 2 and rendered[0] == "[" and rendered[-1] == "]":
            try:
                value = ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                return rendered
            return value if isinstance(value, list) else rendered
        return rendered

    def choices(
        self, spec: str | tuple[str, ...], doc: Mapping[str, Any], *, doc_id: int | None
    ) -> list[str]:
        """``doc_to_choice``: a fixed list, a field holding a list, or a template rendering a list literal."""
        if isinstance(spec, tuple):
            value: Any = list(spec)
        elif spec in self.features:
            value = doc[spec]
        else:
            rendered = self.render(spec, doc, doc_id=doc_id, what="doc_to_choice")
            try:
                value = ast.literal_eval(rendered)
            except (SyntaxError, ValueError) as err:
                raise TemplateError(
                    f"doc_to_choice template {spec!r} rendered {rendered!r} for doc {doc_id}, "
                    "which is not a Python list literal",
                    field=None,
                    template=spec,
                    doc_id=doc_id,
                ) from err
        if not isinstance(value, (list, tuple)) or not all(isinstance(choice, str) for choice in value):
            raise TemplateError(
                f"doc_to_choice {spec!r} gave {value!r} for doc {doc_id}; expected a list of strings",
                field=None,
                template=str(spec),
                doc_id=doc_id,
            )
        return list(value)

    def field_or_template(self, spec: str, doc: Mapping[str, Any], *, doc_id: int | None, what: str) -> str:
        """A field of this document if it has one, else a template (lm-eval's ``description``)."""
        if not spec:
            return ""
        if spec in doc:
            return str(doc[spec])
        return self.render(spec, doc, doc_id=doc_id, what=what)
