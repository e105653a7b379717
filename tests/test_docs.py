"""The documentation lives in docs/: code cites its pages, never files a clone lacks.

Cheap checks only (no mkdocs run here; ``make docs`` builds the site with warnings as errors).
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Built, not written out, so that this file does not cite them itself.
FORBIDDEN = tuple(name + ".md" for name in ("SPEC", "DESIGN"))
DOCS_LINK = re.compile(r"docs/[\w./-]*?\.md(?:#[\w-]+)?")


def _source_files() -> list[pathlib.Path]:
    return sorted(
        path
        for folder in ("jaxbased", "pallas_kernels", "tests")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and path.suffix in {".py", ".md", ".txt", ".cfg", ".toml"}
    )


def _slug(heading: str) -> str:
    # Python-Markdown's toc slugify (what mkdocs uses for heading ids).
    text = re.sub(r"[^\w\s-]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def test_no_file_cites_documents_a_clone_lacks():
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in _source_files()
        for name in FORBIDDEN
        if name in path.read_text(errors="replace")
    ]
    assert not offenders, "cite a page of docs/ instead:\n" + "\n".join(offenders)


@pytest.mark.parametrize("folder", ["jaxbased", "pallas_kernels", "tests", "benchmarks", "configs"])
def test_cited_docs_pages_exist(folder):
    files = [path for path in (ROOT / folder).rglob("*.py")]
    if folder == "tests":
        files.append(ROOT / "README.md")
        files.append(ROOT / "BENCHMARKS.md")
    missing = []
    for path in files:
        for link in DOCS_LINK.findall(path.read_text(errors="replace")):
            page, _, anchor = link.partition("#")
            target = ROOT / page
            if not target.is_file():
                missing.append(f"{path.relative_to(ROOT)}: {link} (no such page)")
            elif anchor and anchor not in _anchors(target):
                missing.append(f"{path.relative_to(ROOT)}: {link} (no such heading)")
    assert not missing, "\n".join(missing)
