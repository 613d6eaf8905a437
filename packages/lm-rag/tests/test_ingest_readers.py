"""Readers and discovery: each format read from a file built here, each bad input refused with a reason."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import docx
import openpyxl
import pytest
from pypdf import PdfReader, PdfWriter
from reportlab.pdfgen import canvas

from lmstack.rag._errors import RAGConfigError, UnreadableDocumentError
from lmstack.rag.ingest import (
    SUPPORTED_SUFFIXES,
    ChunkingConfig,
    chunk_document,
    discover,
    read_document,
    regex_token_counter,
)

MIXED = "lmstack 把文档切成块, then embeds each chunk; 检索时先做 BM25 再融合 dense scores。"


def make_pdf(pages: list[list[str]]) -> bytes:
    buf = io.BytesIO()
    pdf = canvas.Canvas(buf)
    for lines in pages:
        for i, line in enumerate(lines):
            pdf.drawString(72, 720 - 16 * i, line)
        pdf.showPage()
    pdf.save()
    return buf.getvalue()


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------- readers


def test_markdown_keeps_text_title_hash_and_size(tmp_path: Path) -> None:
    text = f"Preface line.\n\n# 用户手册 Guide\n\n## 安装\n\n{MIXED}\n"
    path = write(tmp_path / "guide.md", text)
    doc = read_document(path, source="docs/guide.md")
    assert doc.text == text
    assert doc.kind == "markdown"
    assert doc.source == "docs/guide.md"
    assert doc.metadata["title"] == "用户手册 Guide"
    assert doc.metadata["size"] == len(text.encode("utf-8"))
    assert doc.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_markdown_title_ignores_hash_lines_in_code_fences(tmp_path: Path) -> None:
    doc = read_document(write(tmp_path / "a.markdown", "```sh\n# comment\n```\n\n# Real\n"))
    assert doc.metadata["title"] == "Real"


def test_text_reads_chinese_crlf_and_boms(tmp_path: Path) -> None:
    doc = read_document(write(tmp_path / "zh.txt", "第一行\r\n" + MIXED + "\r\n"))
    assert doc.text == "第一行\n" + MIXED + "\n"
    assert doc.kind == "text" and "title" not in doc.metadata
    bom = read_document(write(tmp_path / "bom.txt", b"\xef\xbb\xbf" + "héllo 世界".encode()))
    assert bom.text == "héllo 世界"
    utf16 = read_document(write(tmp_path / "u16.rst", "Title\n=====\n中文".encode("utf-16")))
    assert utf16.text == "Title\n=====\n中文" and utf16.kind == "text"


def test_python_is_its_source(tmp_path: Path) -> None:
    source = "def f(x):\n    return x + 1\n"
    doc = read_document(write(tmp_path / "m.py", source))
    assert (doc.text, doc.kind) == (source, "python")


def test_html_to_markdownish_text(tmp_path: Path) -> None:
    html = """<!doctype html><html><head><title>Page &amp; Title</title>
    <style>body { color: red }</style><script>var x = "<p>hidden</p>";</script></head>
    <body><nav><a href="/">Home</a> | <a href="/x">Menu</a></nav>
    <h1>Main   heading</h1><p>First   paragraph with
    a line break &lt;tag&gt; &eacute;t&eacute;.</p><div>Second<br>line</div>
    <h2>Sub</h2><ul><li>one</li><li>two</li></ul>
    <table><tr><th>k</th><th>v</th></tr><tr><td>a</td><td>1</td></tr></table>
    <pre>code  keeps
    # its spaces</pre><p>中文段落。</p></body></html>"""
    doc = read_document(write(tmp_path / "p.html", html))
    assert doc.kind == "html"
    assert doc.metadata["title"] == "Page & Title"
    assert doc.text == (
        "# Main heading\n\nFirst paragraph with a line break <tag> été.\n\nSecond\nline\n\n## Sub\n\n"
        "- one\n- two\n\nk | v\na | 1\n\n```\ncode  keeps\n    # its spaces\n```\n\n中文段落。"
    )
    for hidden in ("color", "hidden", "Home", "Menu"):
        assert hidden not in doc.text
    # The # lines are headings for the Markdown chunker; the one inside <pre> is not.
    chunks = chunk_document(doc, ChunkingConfig(chunk_tokens=60, overlap_tokens=8), regex_token_counter)
    assert [c.metadata["headings"] for c in chunks] == [["Main heading"], ["Main heading", "Sub"]]


def test_html_title_falls_back_to_h1_and_unclosed_head(tmp_path: Path) -> None:
    doc = read_document(write(tmp_path / "q.htm", "<head><meta charset=utf-8><body><h1>Only &#20013;</h1>x"))
    assert doc.metadata["title"] == "Only 中"
    assert doc.text == "# Only 中\n\nx"


def test_pdf_pages_are_spans_and_chunk_pages(tmp_path: Path) -> None:
    pages = [[f"Page {n} sentence {i} about topic{n}." for i in range(30)] for n in (1, 2, 3)]
    path = write(tmp_path / "book.pdf", make_pdf(pages))
    doc = read_document(path)
    assert doc.kind == "pdf" and doc.metadata["pages"] == 3
    assert [s.metadata for s in doc.spans] == [{"page": 1}, {"page": 2}, {"page": 3}]
    # Independent check: pypdf's own per-page text is what each span holds.
    reference = [p.extract_text().strip() for p in PdfReader(path).pages]
    assert [doc.text[s.start : s.end] for s in doc.spans] == reference
    assert doc.text == "\n\n".join(reference)
    chunks = chunk_document(doc, ChunkingConfig(chunk_tokens=40, overlap_tokens=5), regex_token_counter)
    assert {c.metadata["page"] for c in chunks} == {1, 2, 3}
    for chunk in chunks:
        # The chunk's first words name the page it starts on (every line mentions topicN).
        first_topic = next(w for w in chunk.text.split() if w.startswith("topic"))
        assert first_topic == f"topic{chunk.metadata['page']}."


def test_docx_headings_tables_and_chinese(tmp_path: Path) -> None:
    document = docx.Document()
    document.add_heading("产品 Manual", level=1)
    document.add_paragraph("Intro paragraph.")
    document.add_heading("安装 Install", level=2)
    document.add_paragraph(MIXED)
    table = document.add_table(rows=2, cols=2)
    for r, row in enumerate([("键", "值"), ("port", "8080")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    document.add_heading("Deep", level=4)
    document.add_paragraph("")  # empty paragraphs are dropped
    document.add_paragraph("Tail.")
    path = tmp_path / "m.docx"
    document.save(str(path))
    doc = read_document(path)
    assert doc.kind == "docx"
    expected = (
        f"# 产品 Manual\n\nIntro paragraph.\n\n## 安装 Install\n\n{MIXED}\n\n键 | 值\n\nport | 8080\n\n"
    )
    assert doc.text == expected + "#### Deep\n\nTail."
    assert doc.metadata["title"] == "产品 Manual"
    chunks = chunk_document(doc, ChunkingConfig(chunk_tokens=200, overlap_tokens=8), regex_token_counter)
    assert [c.metadata["headings"] for c in chunks] == [
        ["产品 Manual"],
        ["产品 Manual", "安装 Install"],
        ["产品 Manual", "安装 Install", "Deep"],
    ]


def test_xlsx_rows_with_headers_and_sheet_spans(tmp_path: Path) -> None:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.title = "People"
    sheet.append(["name", "city", "age"])
    sheet.append(["Ada", "London", 36])
    sheet.append([None, None, None])  # empty rows are dropped
    sheet.append(["Lin", "上海", 29.0])
    numbers = workbook.create_sheet("Q3")
    numbers.append([1, 2])
    numbers.append([3, None])
    workbook.create_sheet("Empty")
    path = tmp_path / "t.xlsx"
    workbook.save(str(path))
    doc = read_document(path)
    people = "name: Ada; city: London; age: 36\nname: Lin; city: 上海; age: 29"
    assert doc.text == people + "\n\n1; 2\n3"
    assert [(doc.text[s.start : s.end], dict(s.metadata)) for s in doc.spans] == [
        (people, {"sheet": "People"}),
        ("1; 2\n3", {"sheet": "Q3"}),
    ]
    chunks = chunk_document(doc, ChunkingConfig(chunk_tokens=200, overlap_tokens=2), regex_token_counter)
    assert [(c.text, c.metadata["sheet"]) for c in chunks] == [(people, "People"), ("1; 2\n3", "Q3")]


def test_csv_sniffs_dialect_and_header(tmp_path: Path) -> None:
    doc = read_document(write(tmp_path / "d.csv", "id;label\n1;first item\n\n2;第二\n"))
    assert doc.kind == "csv"
    assert doc.text == "id: 1; label: first item\nid: 2; label: 第二"
    plain = read_document(write(tmp_path / "n.csv", "1,2,3\n4,5,6\n"))
    assert plain.text == "1; 2; 3\n4; 5; 6"


def test_xlsx_row_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmstack.rag.ingest import _readers

    monkeypatch.setattr(_readers, "MAX_ROWS", 3)
    workbook = openpyxl.Workbook()
    for i in range(5):
        workbook.active.append([i, i * 2])
    workbook.save(str(tmp_path / "big.xlsx"))
    with pytest.raises(UnreadableDocumentError, match="over 3 rows"):
        read_document(tmp_path / "big.xlsx")


# ------------------------------------------------------------------------------------------------ bad input


def _encrypted_pdf() -> bytes:
    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(make_pdf([["secret text"]]))))
    writer.encrypt("password", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def _scanned_pdf() -> bytes:
    buf = io.BytesIO()
    pdf = canvas.Canvas(buf)
    pdf.rect(100, 100, 200, 200, fill=1)  # a drawing, no text
    pdf.showPage()
    pdf.save()
    return buf.getvalue()


GOOD_PDF = make_pdf([["one two three"], ["four five six"]])
BAD_INPUTS = {
    "random.pdf": (random.Random(1).randbytes(4000), "corrupt PDF"),
    "truncated.pdf": (GOOD_PDF[: len(GOOD_PDF) // 2], "corrupt PDF"),
    "encrypted.pdf": (_encrypted_pdf(), "encrypted PDF"),
    "scanned.pdf": (_scanned_pdf(), "no extractable text (scanned PDF?)"),
    "empty.md": (b"", "empty file"),
    "blank.txt": (b"  \n\t\n", "no text"),
    "tags.html": (b"<html><script>x()</script></html>", "no text"),
    "nul.txt": (b"\x00" * 64, "binary content in a .txt file"),
    "elf.py": (random.Random(2).randbytes(2000).replace(b"\x00", b"\x01"), "binary content in a .py file"),
    "latin1.txt": (
        "Café au lait\n".encode("latin-1"),
        "not UTF-8 (invalid byte 0xe9 at offset 3); convert it to UTF-8",
    ),
    "random.docx": (random.Random(3).randbytes(3000), "corrupt DOCX"),
    "random.xlsx": (random.Random(4).randbytes(3000), "corrupt XLSX"),
    "text.docx": (b"this is not a zip file", "corrupt DOCX"),
    "archive.zip": (b"PK\x03\x04", "unsupported file type '.zip'"),
    "noext": (b"hello", "unsupported file type '(no suffix)'"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_unreadable_with_reason(tmp_path: Path, name: str) -> None:
    data, reason = BAD_INPUTS[name]
    path = write(tmp_path / name, data)
    with pytest.raises(UnreadableDocumentError) as info:
        read_document(path)
    assert reason in info.value.reason
    assert info.value.path == path


def test_file_over_max_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "big.md", "x" * 2500)
    with pytest.raises(UnreadableDocumentError) as info:
        read_document(path, max_bytes=1000)
    assert info.value.reason == "file is 2.5 kB, over the 1 kB limit (max_bytes)"
    assert read_document(path, max_bytes=2500).metadata["size"] == 2500


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UnreadableDocumentError, match="cannot read the file"):
        read_document(tmp_path / "gone.md")


# ---------------------------------------------------------------------------------------------- discovery


def test_supported_suffixes() -> None:
    assert dict(SUPPORTED_SUFFIXES) == {
        ".md": "markdown", ".markdown": "markdown", ".txt": "text", ".rst": "text", ".html": "html",
        ".htm": "html", ".pdf": "pdf", ".docx": "docx", ".xlsx": "xlsx", ".csv": "csv", ".py": "python",
    }  # fmt: skip


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in [
        "docs/index.md", "docs/guide/install.md", "docs/guide/UPPER.MD", "docs/api.py", "docs/image.png",
        "docs/.hidden.md", "docs/.git/config.md", "docs/.venv/lib/site.py", "docs/env/pyvenv.cfg",
        "docs/env/lib/x.py", "docs/node_modules/pkg/readme.md", "docs/__pycache__/m.py",
        "docs/drafts/wip.md", "notes/index.md",
    ]:  # fmt: skip
        write(tmp_path / name, "text")
    return tmp_path


def test_discover_folders(tree: Path) -> None:
    found = discover([tree / "docs", tree / "notes"])
    assert [s for _, s in found] == [
        "docs/api.py", "docs/drafts/wip.md", "docs/guide/UPPER.MD", "docs/guide/install.md", "docs/index.md",
        "notes/index.md",
    ]  # fmt: skip
    for path, source in found:
        assert path.is_file() and path.as_posix().endswith(source)


def test_discover_include_exclude(tree: Path) -> None:
    assert [s for _, s in discover([tree / "docs"], include=["*.md"], exclude=["drafts/*"])] == [
        "docs/guide/install.md",
        "docs/index.md",
    ]
    assert [s for _, s in discover([tree / "docs"], include=["guide/*"])] == [
        "docs/guide/UPPER.MD",
        "docs/guide/install.md",
    ]


def test_discover_files_relative_to_cwd_or_absolute(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree / "docs")
    found = discover(["guide/install.md", tree / "docs" / "image.png", tree / "notes" / "index.md", "."])
    sources = [s for _, s in found]
    # An explicitly named unsupported file is returned (the reader reports it); one file is listed once.
    assert sources[:2] == [(tree / "notes" / "index.md").resolve().as_posix(), "docs/api.py"]
    assert "guide/install.md" in sources and "image.png" in sources
    assert "docs/guide/install.md" not in sources
    assert len(sources) == 7


def test_discover_missing_path(tmp_path: Path) -> None:
    with pytest.raises(RAGConfigError, match="does not exist"):
        discover([tmp_path / "nope"])


def test_discover_then_read_everything(tree: Path) -> None:
    docs = [read_document(path, source=source) for path, source in discover([tree])]
    assert [d.source for d in docs] == [
        f"{tree.name}/{s}"
        for s in ("docs/api.py", "docs/drafts/wip.md", "docs/guide/UPPER.MD", "docs/guide/install.md",
                  "docs/index.md", "notes/index.md")
    ]  # fmt: skip
    assert all(d.text == "text" for d in docs)
    assert [d.kind for d in docs] == ["python", "markdown", "markdown", "markdown", "markdown", "markdown"]
