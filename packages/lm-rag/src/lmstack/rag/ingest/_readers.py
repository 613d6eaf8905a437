"""Readers: one file of any supported format into a :class:`~lmstack.rag.Document`."""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import hashlib
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from lmstack.rag._errors import UnreadableDocumentError
from lmstack.rag._types import Document, Span
from lmstack.rag.ingest._discover import SUPPORTED_SUFFIXES, kind_of
from lmstack.rag.ingest._html import html_to_text
from lmstack.rag.ingest._markdown import markdown_headings

__all__ = ["MAX_ROWS", "read_document"]

logger = logging.getLogger(__name__)

MAX_ROWS = 200_000
"""The most spreadsheet rows (all sheets together) one document may have."""

_TEXT_KINDS = frozenset({"markdown", "text", "html", "csv", "python"})


class _Unreadable(Exception):
    """A reader's way of saying why; read_document adds the path."""


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{int(n)} bytes"


def _decode(data: bytes, suffix: str) -> str:
    """UTF-8 (with or without a BOM) or UTF-16 with a BOM; anything else is refused with the reason."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise _Unreadable(
                f"invalid UTF-16 ({exc.reason} at offset {exc.start}); convert it to UTF-8"
            ) from exc
    if b"\x00" in data:
        raise _Unreadable(f"binary content in a {suffix} file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        replaced = data.decode("utf-8", errors="replace")
        if replaced.count("\ufffd") > 0.3 * max(len(replaced), 1):
            raise _Unreadable(f"binary content in a {suffix} file") from exc
        bad = data[exc.start]
        raise _Unreadable(
            f"not UTF-8 (invalid byte 0x{bad:02x} at offset {exc.start}); convert it to UTF-8"
        ) from exc


def _markdown_title(text: str) -> str | None:
    return next((h.title for h, _ in markdown_headings(text) if h.level == 1 and h.title), None)


def _read_pdf(data: bytes) -> tuple[str, dict[str, Any], tuple[Span, ...]]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Unreadable("encrypted PDF: it needs a password; save a decrypted copy to ingest it")
        texts = [page.extract_text() or "" for page in reader.pages]
        title = reader.metadata.title if reader.metadata is not None else None
    except _Unreadable:
        raise
    except Exception as exc:
        logger.debug("pypdf failed", exc_info=True)
        if "decrypt" in str(exc).lower() or "crypt" in type(exc).__name__.lower():
            raise _Unreadable(f"encrypted PDF: {exc}; save a decrypted copy to ingest it") from exc
        raise _Unreadable(f"corrupt PDF: {type(exc).__name__}: {exc}") from exc
    if not texts:
        raise _Unreadable("corrupt PDF: it has no pages")
    if not any(t.strip() for t in texts):
        raise _Unreadable("no extractable text (scanned PDF?); run OCR on it first")
    spans, parts, offset = [], [], 0
    for number, page_text in enumerate(texts, start=1):
        page_text = page_text.strip()
        spans.append(Span(offset, offset + len(page_text), {"page": number}))
        parts.append(page_text)
        offset += len(page_text) + 2
    meta: dict[str, Any] = {"pages": len(texts)}
    if isinstance(title, str) and title.strip() and title.strip().lower() != "untitled":
        meta["title"] = title.strip()
    return "\n\n".join(parts), meta, tuple(spans)


def _read_docx(data: bytes) -> tuple[str, dict[str, Any], tuple[Span, ...]]:
    import docx
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
        blocks: list[str] = []
        title = document.core_properties.title or None
        for item in document.iter_inner_content():
            if isinstance(item, Table):
                for row in item.rows:
                    cells: list[str] = []
                    last = None
                    for cell in row.cells:
                        if cell._tc is last:  # a merged cell is listed once per grid column it spans
                            continue
                        last = cell._tc
                        cells.append(" ".join(cell.text.split()))
                    if any(cells):
                        blocks.append(" | ".join(cells))
                continue
            text = item.text.strip()
            if not text:
                continue
            style = item.style.name if item.style is not None else ""
            level = 1 if style == "Title" else _heading_level(style)
            if level:
                text = f"{'#' * level} {' '.join(text.split())}"
                if level == 1 and not title:
                    title = text[2:]
            blocks.append(text)
    except Exception as exc:
        logger.debug("python-docx failed", exc_info=True)
        raise _Unreadable(f"corrupt DOCX: {type(exc).__name__}: {exc}") from exc
    return "\n\n".join(blocks), {"title": title} if title else {}, ()


def _heading_level(style: str) -> int:
    if style.startswith("Heading ") and style[8:].isdigit() and 1 <= int(style[8:]) <= 6:
        return int(style[8:])
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return " ".join(str(value).split())


def _looks_like_header(row: Sequence[str]) -> bool:
    # Labels: all filled, none a number, no two alike.
    if not row or any(not cell for cell in row) or len(set(row)) != len(row):
        return False
    return not any(_is_number(cell) for cell in row)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _rows_to_lines(rows: Iterable[Sequence[Any]], counted: list[int]) -> list[str]:
    """Rows as ``header: value; ...`` lines (plain ``value; ...`` when the first row is not a header)."""
    table = []
    for row in rows:
        cells = [_cell(v) for v in row]
        while cells and not cells[-1]:
            cells.pop()
        if not any(cells):
            continue
        counted[0] += 1
        if counted[0] > MAX_ROWS:
            raise _Unreadable(f"over {MAX_ROWS:,} rows; split the spreadsheet or export the part to ingest")
        table.append(cells)
    if len(table) > 1 and _looks_like_header(table[0]):
        header = table[0]
        names = [*header, *(f"column {i + 1}" for i in range(len(header), max(map(len, table))))]
        return ["; ".join(f"{names[i]}: {v}" for i, v in enumerate(cells) if v) for cells in table[1:]]
    return ["; ".join(v for v in cells if v) for cells in table]


def _read_xlsx(data: bytes) -> tuple[str, dict[str, Any], tuple[Span, ...]]:
    import openpyxl

    counted = [0]
    parts: list[str] = []
    spans: list[Span] = []
    offset = 0
    try:
        workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
        try:
            title = workbook.properties.title
            for sheet in workbook.worksheets:
                text = "\n".join(_rows_to_lines(sheet.iter_rows(values_only=True), counted))
                if not text:
                    continue
                spans.append(Span(offset, offset + len(text), {"sheet": sheet.title}))
                parts.append(text)
                offset += len(text) + 2
        finally:
            workbook.close()
    except _Unreadable:
        raise
    except Exception as exc:
        logger.debug("openpyxl failed", exc_info=True)
        raise _Unreadable(f"corrupt XLSX: {type(exc).__name__}: {exc}") from exc
    return "\n\n".join(parts), {"title": title} if title else {}, tuple(spans)


def _read_csv(text: str) -> tuple[str, dict[str, Any], tuple[Span, ...]]:
    sample = text[:64_000]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    try:
        lines = _rows_to_lines(csv.reader(io.StringIO(text), dialect), [0])
    except csv.Error as exc:
        raise _Unreadable(f"malformed CSV: {exc}") from exc
    return "\n".join(lines), {}, ()


def _read_text(kind: str, text: str) -> tuple[str, dict[str, Any], tuple[Span, ...]]:
    if kind == "html":
        try:
            body, title = html_to_text(text)
        except Exception as exc:  # html.parser is lenient; this is a last line of defence
            logger.debug("html.parser failed", exc_info=True)
            raise _Unreadable(f"malformed HTML: {type(exc).__name__}: {exc}") from exc
        return body, {"title": title} if title else {}, ()
    if kind == "csv":
        return _read_csv(text)
    if kind == "markdown":
        title = _markdown_title(text)
        return text, {"title": title} if title else {}, ()
    return text, {}, ()


_BINARY_READERS: dict[str, Callable[[bytes], tuple[str, dict[str, Any], tuple[Span, ...]]]] = {
    "pdf": _read_pdf,
    "docx": _read_docx,
    "xlsx": _read_xlsx,
}


def read_document(path: str | Path, *, source: str | None = None, max_bytes: int = 50_000_000) -> Document:
    """Reads one file into a :class:`~lmstack.rag.Document`.

    Markdown, text and Python files are read as they are (UTF-8, with or without a BOM, or UTF-16 with a
    BOM; line ends normalised to newlines); HTML becomes Markdown-ish text; PDF pages are joined with
    blank lines, one span per page (``{"page": n}``, 1-based); DOCX headings become ``#`` lines and
    tables ``cell | cell`` rows; XLSX and CSV rows become ``header: value; ...`` lines, one span per
    sheet (``{"sheet": name}``).

    Args:
        path: The file.
        source: The name the index will know it by (see :func:`discover`); the path as given when None.
        max_bytes: Larger files are refused.

    Returns:
        The document; ``content_hash`` is the SHA-256 of the file's bytes, ``metadata`` has ``size``
        (bytes) and ``title`` where the format has one.

    Raises:
        UnreadableDocumentError: The file cannot be ingested: an unsupported suffix, empty, too large,
            binary or not UTF-8 text, a corrupt or encrypted PDF, a PDF without extractable text, a
            corrupt DOCX or XLSX, too many rows. Its ``reason`` says which and what to do.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    kind = kind_of(path)
    try:
        if kind is None:
            supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
            raise _Unreadable(f"unsupported file type {suffix or '(no suffix)'!r} (supported: {supported})")
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise _Unreadable(f"file is {_size(size)}, over the {_size(max_bytes)} limit (max_bytes)")
            data = path.read_bytes()
        except OSError as exc:
            raise _Unreadable(f"cannot read the file: {exc.strerror or exc}") from exc
        if not data:
            raise _Unreadable("empty file")
        if kind in _TEXT_KINDS:
            text = _decode(data, suffix).replace("\r\n", "\n").replace("\r", "\n")
            text, metadata, spans = _read_text(kind, text)
        else:
            text, metadata, spans = _BINARY_READERS[kind](data)
        if not text.strip():
            raise _Unreadable("no text")
    except _Unreadable as exc:
        raise UnreadableDocumentError(path, str(exc)) from exc.__cause__
    return Document(
        source=source if source is not None else path.as_posix(),
        text=text,
        kind=kind,
        content_hash=hashlib.sha256(data).hexdigest(),
        metadata={"size": len(data), **metadata},
        spans=spans,
    )
