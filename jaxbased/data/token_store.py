"""A tokenized corpus on disk: one array of token ids (TensorStore, zarr) plus metadata.

Layout of a dataset directory::

    metadata.json      format version, tokenizer spec, vocab size, counts, splits, sources
    tokens/            zarr array [num_tokens] of token ids (uint16 or uint32); each document is
                       followed by the tokenizer's end-of-document id
    document_starts/   zarr array [num_documents] int64: where each document begins
    tokenizer.json     (or *.tiktoken) when the tokenizer has a file

The validation split is the tail of the token array (``validation_fraction`` of it); training
windows never cross into it. A dataset is written into a temporary sibling directory and renamed
into place when complete, so a reader never sees a half-written one.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxbased.data.corpus import Document
from jaxbased.data.tokenizers import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
# Splits smaller than this are read into memory when opened; larger ones are sliced lazily.
IN_MEMORY_BYTES = 1 << 30


def _zarr_spec(path: pathlib.Path) -> dict[str, Any]:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}


def _write_json_atomically(path: pathlib.Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(temporary, path)


class _Progress:
    """A one-line progress report on stderr (documents, tokens, tokens/s)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.start, self.last = enabled, time.monotonic(), 0.0

    def update(self, documents: int, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < 0.5):
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        end = "\n" if final else ""
        sys.stderr.write(
            f"\rtokenized {documents:,} documents, {tokens:,} tokens ({rate:,.0f} tokens/s){end}"
        )
        sys.stderr.flush()


def write_token_dataset(
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    output: str | pathlib.Path,
    *,
    validation_fraction: float = 0.05,
    overwrite: bool = False,
    progress: bool = True,
    extra_metadata: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Tokenize ``documents`` into a dataset directory at ``output`` (atomically).

    Raises ``ValueError`` for an existing ``output`` (unless ``overwrite``), an empty corpus, or a
    ``validation_fraction`` outside [0, 0.5].
    """
    import tensorstore as ts

    output = pathlib.Path(output)
    if not 0.0 <= validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 0.5]")
    if output.exists() and not overwrite:
        raise ValueError(
            f"output {str(output)!r} already exists; pass overwrite=True to replace it"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        tokens = ts.open(
            _zarr_spec(staging / "tokens"),
            create=True,
            dtype=np.dtype(dtype).name,
            shape=[0],
            chunk_layout=ts.ChunkLayout(chunk_shape=[1 << 20]),
        ).result()
        starts: list[int] = []
        sources: list[str] = []
        written, pending, pending_size, max_token = 0, [], 0, -1
        report = _Progress(progress)

        def flush() -> None:
            nonlocal written, pending, pending_size
            if not pending:
                return
            piece = np.concatenate(pending).astype(dtype)
            tokens.resize(exclusive_max=[written + len(piece)], expand_only=True).result()
            tokens[written : written + len(piece)].write(piece).result()
            written += len(piece)
            pending, pending_size = [], 0

        for document in documents:
            ids = tokenizer.encode(document.text)
            if not ids:
                continue
            ids.append(tokenizer.eos_id)
            array = np.asarray(ids, np.int64)
            max_token = max(max_token, int(array.max()))
            starts.append(written + pending_size)
            sources.append(document.source)
            pending.append(array)
            pending_size += len(array)
            if pending_size >= 1 << 22:
                flush()
            report.update(len(starts), written + pending_size)
        flush()
        report.update(len(starts), written, final=True)
        if written < 2:
            raise ValueError("the corpus is empty: no document produced any token")
        if max_token >= tokenizer.vocab_size:
            raise ValueError(f"token id {max_token} >= tokenizer vocab_size {tokenizer.vocab_size}")

        document_starts = ts.open(
            _zarr_spec(staging / "document_starts"),
            create=True,
            dtype="int64",
            shape=[len(starts)],
        ).result()
        document_starts.write(np.asarray(starts, np.int64)).result()
        tokenizer.save(staging)
        validation_start = written - round(validation_fraction * written)
        metadata = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tokenizer.spec(),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "max_token_id": max_token,
            "num_tokens": written,
            "num_documents": len(starts),
            "dtype": np.dtype(dtype).name,
            "splits": {"train": [0, validation_start], "validation": [validation_start, written]},
            "sources": sources[:1000],
            **(extra_metadata or {}),
        }
        _write_json_atomically(staging / "metadata.json", metadata)
        if output.exists():
            trash = output.with_name(f".{output.name}.old-{uuid.uuid4().hex}")
            os.replace(output, trash)
            os.replace(staging, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


@dataclass
class TokenDataset:
    """An opened dataset directory: metadata, tokenizer and lazily read token arrays."""

    path: pathlib.Path
    metadata: dict[str, Any]

    @classmethod
    def open(cls, path: str | pathlib.Path) -> TokenDataset:
        path = pathlib.Path(path)
        metadata_path = path / "metadata.json"
        if not metadata_path.is_file():
            raise ValueError(
                f"data path {str(path)!r} is not a prepared dataset (no metadata.json); "
                "create one with jaxbased-prepare-data"
            )
        metadata = json.loads(metadata_path.read_text())
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"dataset {str(path)!r} has format_version={metadata.get('format_version')}; "
                f"this jaxbased reads {FORMAT_VERSION}"
            )
        return cls(path, metadata)

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def num_tokens(self) -> int:
        return int(self.metadata["num_tokens"])

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.metadata["tokenizer"], self.path)

    def split_bounds(self, split: str) -> tuple[int, int]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not known; allowed: {SPLITS}")
        start, end = self.metadata["splits"][split]
        return int(start), int(end)

    def tokens(self, split: str) -> Any:
        """The split's token ids: a NumPy array if small, else a lazily read TensorStore view."""
        import tensorstore as ts

        start, end = self.split_bounds(split)
        array = ts.open(_zarr_spec(self.path / "tokens"), open=True).result()[start:end]
        if (end - start) * array.dtype.numpy_dtype.itemsize <= IN_MEMORY_BYTES:
            return array.read().result()
        return array

    def document_starts(self) -> np.ndarray:
        import tensorstore as ts

        return (
            ts.open(_zarr_spec(self.path / "document_starts"), open=True).result().read().result()
        )
