"""Tokenizers: byte-level (default, no files), a byte-level BPE trained locally, and GPT-2 BPE.

Every tokenizer has ``vocab_size``, ``eos_id`` (appended after each document), ``encode`` and
``decode``, and a JSON ``spec`` from which :func:`load_tokenizer` rebuilds it, given the directory
that holds its file (``tokenizer.json`` or ``*.tiktoken``), so that a dataset or a training
workdir carries its own tokenizer.

The ``tokenizers`` and ``tiktoken`` packages are imported only by the tokenizers that need them.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

#: GPT-2's pre-tokenization pattern (for ``.tiktoken`` rank files).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"
TOKENIZER_KINDS: tuple[str, ...] = ("byte", "bpe", "gpt2")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def spec(self) -> dict[str, Any]: ...

    def save(self, directory: pathlib.Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; id 256 ends a document. ``vocab_size`` 257."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": "byte"}

    def save(self, directory: pathlib.Path) -> None:
        del directory  # nothing to save


class HuggingFaceTokenizer:
    """A ``tokenizers`` tokenizer from a ``tokenizer.json`` (a local BPE or GPT-2's)."""

    def __init__(self, path: pathlib.Path, kind: str = "bpe") -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {str(path)!r} does not exist")
        self.path, self.kind = path, kind
        self._tokenizer = RustTokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eos = self._tokenizer.token_to_id(END_OF_TEXT)
        if eos is None:
            raise ValueError(f"tokenizer {str(path)!r} has no {END_OF_TEXT} token")
        self.eos_id = eos

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids if int(i) != self.eos_id])

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": "tokenizer.json"}

    def save(self, directory: pathlib.Path) -> None:
        target = pathlib.Path(directory) / "tokenizer.json"
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)


class TiktokenTokenizer:
    """GPT-2 BPE from a tiktoken rank file (``gpt2.tiktoken``: base64 token, rank per line)."""

    def __init__(self, path: pathlib.Path) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {str(path)!r} does not exist")
        self.path = path
        ranks = load_tiktoken_bpe(str(path))
        self.eos_id = len(ranks)
        self._encoding = tiktoken.Encoding(
            name=path.stem,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={END_OF_TEXT: self.eos_id},
        )
        self.vocab_size = self.eos_id + 1

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids if int(i) != self.eos_id])

    def spec(self) -> dict[str, Any]:
        return {"kind": "gpt2", "file": self.path.name}

    def save(self, directory: pathlib.Path) -> None:
        target = pathlib.Path(directory) / self.path.name
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)


def train_bpe(texts: Iterable[str], vocab_size: int, output: pathlib.Path) -> HuggingFaceTokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids on ``texts`` and save ``output``."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"bpe vocab_size={vocab_size} must be > 257 (256 bytes + {END_OF_TEXT})")
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(output))
    return HuggingFaceTokenizer(output, kind="bpe")


def gpt2_tokenizer(path: str | pathlib.Path | None = None) -> Tokenizer:
    """GPT-2 BPE from a local ``.tiktoken`` or ``tokenizer.json`` file, or from the hub if None."""
    if path is not None:
        path = pathlib.Path(path)
        if path.suffix == ".tiktoken":
            return TiktokenTokenizer(path)
        return HuggingFaceTokenizer(path, kind="gpt2")
    try:
        from tokenizers import Tokenizer as RustTokenizer

        hub = RustTokenizer.from_pretrained("gpt2")
    except Exception as error:  # offline, or the hub refused
        raise ValueError(
            "GPT-2 tokenizer: no local file given and the Hugging Face hub could not be reached "
            f"({error}); pass a gpt2.tiktoken or tokenizer.json path"
        ) from error
    import tempfile

    directory = pathlib.Path(tempfile.mkdtemp(prefix="jaxbased-gpt2-"))
    hub.save(str(directory / "tokenizer.json"))
    return HuggingFaceTokenizer(directory / "tokenizer.json", kind="gpt2")


def load_tokenizer(spec: dict[str, Any], directory: str | pathlib.Path) -> Tokenizer:
    """Rebuild a tokenizer from its ``spec`` and the directory holding its file."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("bpe", "gpt2"):
        path = pathlib.Path(directory) / spec["file"]
        if path.suffix == ".tiktoken":
            return TiktokenTokenizer(path)
        return HuggingFaceTokenizer(path, kind=kind)
    raise ValueError(f"tokenizer kind={kind!r} is not known; allowed: {TOKENIZER_KINDS}")
