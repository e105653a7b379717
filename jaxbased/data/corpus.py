"""Text sources: files, folders and globs, the built-in default corpus, Hugging Face datasets.

The built-in corpus is the Python standard library's own ``.py`` source (every machine that runs
jaxbased has it): the files under ``sysconfig.get_paths()["stdlib"]``, sorted by path, skipping
``test``/``tests``/``idlelib``/``site-packages`` folders, until ``max_bytes`` of text. Its exact
content depends on the Python version; the dataset metadata records a hash of it.
"""

from __future__ import annotations

import glob
import hashlib
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

SKIPPED_STDLIB_PARTS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
)
HUGGING_FACE_PREFIX = "hf:"


@dataclass(frozen=True)
class Document:
    source: str
    text: str


def _is_text(path: pathlib.Path) -> bool:
    with path.open("rb") as handle:
        return b"\0" not in handle.read(4096)


def expand_inputs(inputs: Sequence[str]) -> list[pathlib.Path]:
    """Files named by ``inputs`` (files, folders searched recursively, globs), sorted, deduplicated.

    Raises ``ValueError`` naming each input that matches no text file.
    """
    if not inputs:
        raise ValueError("inputs is empty; give text files, folders or globs")
    files: dict[pathlib.Path, None] = {}
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found = [path]
        else:
            found = sorted(pathlib.Path(p) for p in glob.glob(item, recursive=True))
            found = [p for p in found if p.is_file()]
        found = [p for p in found if _is_text(p)]
        if not found:
            raise ValueError(f"input {item!r} matches no text file (missing path or empty folder)")
        for p in found:
            files[p] = None
    return list(files)


def read_documents(inputs: Sequence[str]) -> Iterator[Document]:
    """One document per file (UTF-8, undecodable bytes replaced); ``hf:NAME[:SPLIT]`` streams a
    Hugging Face dataset's ``text`` column (needs the ``datasets`` package and the network)."""
    local = [item for item in inputs if not item.startswith(HUGGING_FACE_PREFIX)]
    for item in inputs:
        if item.startswith(HUGGING_FACE_PREFIX):
            yield from _hugging_face_documents(item[len(HUGGING_FACE_PREFIX) :])
    if local:
        for path in expand_inputs(local):
            yield Document(str(path), path.read_text(encoding="utf-8", errors="replace"))


def _hugging_face_documents(name: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            f"input 'hf:{name}' needs the `datasets` package (pip install datasets)"
        ) from error
    dataset_name, _, split = name.partition(":")
    try:
        stream = datasets.load_dataset(dataset_name, split=split or "train", streaming=True)
    except Exception as error:
        raise ValueError(
            f"Hugging Face dataset {dataset_name!r} could not be loaded: {error}"
        ) from error
    for index, row in enumerate(stream):
        yield Document(f"hf:{dataset_name}/{index}", row["text"])


def builtin_corpus_files(max_bytes: int) -> list[pathlib.Path]:
    """The standard-library source files of the built-in corpus, in order, up to ``max_bytes``."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes} must be >= 1")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if SKIPPED_STDLIB_PARTS.intersection(relative[:-1]):
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        chosen.append(path)
        total += size
        if total >= max_bytes:
            break
    if not chosen:
        raise ValueError(f"no Python standard library sources found under {root}")
    return chosen


def builtin_corpus_fingerprint(files: Sequence[pathlib.Path]) -> str:
    """A short hash of the corpus content, to tell corpora of different Pythons apart."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
