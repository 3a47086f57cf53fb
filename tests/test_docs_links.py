"""The documents the README and the code point at live in this repository: every relative link
in README.md and docs/*.md names a file here, and every section the code cites ("spec §N",
"tensorrt-rtx-notes §N") is a heading of that document."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITING = ("trt_twotower", "tests")  # folders whose Python files cite sections

MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# A file named in code style, e.g. `docs/openai-api.md`: the way these documents refer to each
# other as often as with links.
CODE_PATH = re.compile(r"`([\w./-]+\.md)(?:#[\w-]*)?`")
SECTION = re.compile(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
# "spec §2.3", "Spec §5.1 ... and §5.2/§5.3", a bare "(§7.4)": the code's citations of the
# model spec; "tensorrt-rtx-notes §3" names the other document.
CITATION = re.compile(r"(tensorrt-rtx-notes\s+)?§(\d+(?:\.\d+)*)")
CITED = {None: ROOT / "docs" / "twotower-spec.md",
         "tensorrt-rtx-notes": ROOT / "docs" / "tensorrt-rtx-notes.md"}


def relative_links(document: Path) -> list[str]:
    text = document.read_text()
    links = MARKDOWN_LINK.findall(text) + CODE_PATH.findall(text)
    return [link for link in links if not re.match(r"^[a-z][\w+.-]*:", link)]


def resolves(document: Path, link: str) -> bool:
    """A link resolves against the document's folder; a code-style path also against the
    repository root, where the README's and docs' paths start."""
    path = link.split("#")[0]
    if not path:
        return True
    bases = [document.parent] + ([ROOT] if not link.startswith((".", "/")) else [])
    return any((base / path).resolve().is_file() and
               (base / path).resolve().is_relative_to(ROOT) for base in bases)


def sections(document: Path) -> set[str]:
    return set(SECTION.findall(document.read_text()))


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_name_files_in_the_repository(document: Path):
    broken = [link for link in relative_links(document) if not resolves(document, link)]
    assert not broken, f"{document.relative_to(ROOT)} links to files not in the repository: " \
                       f"{broken}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_document_points_at_the_shared_folder(document: Path):
    text = document.read_text()
    assert "shared/docs" not in text and "../shared" not in text, \
        f"{document.relative_to(ROOT)} points outside the repository; copy the document into docs/"


def test_cited_sections_exist():
    headings = {name: sections(path) for name, path in CITED.items()}
    missing = []
    sources = sorted(path for folder in CITING for path in (ROOT / folder).rglob("*.py"))
    for source in sources:
        for line_no, line in enumerate(source.read_text().splitlines(), 1):
            for prefix, number in CITATION.findall(line):
                name = prefix.strip() or None
                if number not in headings[name]:
                    missing.append(f"{source.relative_to(ROOT)}:{line_no}: "
                                   f"{prefix}§{number} is not a section of {CITED[name].name}")
    assert not missing, "\n".join(missing)


def test_section_parser_reads_the_spec_numbering():
    """Guards the check above against passing vacuously: headings like '## 2. ...' and
    '### 2.3 ...' are read as sections 2 and 2.3."""
    spec = sections(CITED[None])
    assert {"1", "2", "2.3", "4.7", "5.1", "8"} <= spec
    assert {"1", "3", "5"} <= sections(CITED["tensorrt-rtx-notes"])
