"""The GPT-2 BPE tokenizer of the released checkpoints (docs/model.md: 50257 ids, padded to 50264
embedding rows), found without being asked for.

:func:`checkpoint_tokenizer` takes, in order: an explicit file (``gpt2.tiktoken`` or
``tokenizer.json``); a tokenizer file inside the checkpoint folder (``tokenizer.json``,
``*.tiktoken``, or GPT-2's ``vocab.json`` + ``merges.txt``); the Hugging Face hub's ``gpt2``
when online. Offline with none of these it raises ``ValueError`` saying what to pass.
"""

from __future__ import annotations

import pathlib
import tempfile

from jaxbased.data.tokenizers import END_OF_TEXT, HuggingFaceTokenizer, Tokenizer, gpt2_tokenizer

#: GPT-2's vocabulary: 50256 byte-level BPE tokens plus <|endoftext|>.
GPT2_VOCAB_SIZE = 50257


def _from_vocab_and_merges(vocab: pathlib.Path, merges: pathlib.Path) -> Tokenizer:
    """GPT-2's original files (``vocab.json``, ``merges.txt``) as a ``tokenizer.json``."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tokenizer = RustTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT])
    directory = pathlib.Path(tempfile.mkdtemp(prefix="jaxbased-gpt2-"))
    tokenizer.save(str(directory / "tokenizer.json"))
    return HuggingFaceTokenizer(directory / "tokenizer.json", kind="gpt2")


def find_tokenizer_file(folder: str | pathlib.Path) -> pathlib.Path | None:
    """A GPT-2 tokenizer file in ``folder``: ``tokenizer.json`` or a ``*.tiktoken``, if any."""
    folder = pathlib.Path(folder)
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    return next(iter(sorted(folder.glob("*.tiktoken"))), None)


def checkpoint_tokenizer(
    folder: str | pathlib.Path | None = None, tokenizer_file: str | pathlib.Path | None = None
) -> Tokenizer:
    """The GPT-2 tokenizer for a released checkpoint (see the module docstring for the order)."""
    if tokenizer_file is not None:
        return gpt2_tokenizer(tokenizer_file)
    if folder is not None:
        folder = pathlib.Path(folder)
        found = find_tokenizer_file(folder)
        if found is not None:
            return gpt2_tokenizer(found)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return _from_vocab_and_merges(folder / "vocab.json", folder / "merges.txt")
    try:
        return gpt2_tokenizer(None)
    except ValueError as error:
        raise ValueError(
            f"{error}. The released checkpoints use GPT-2's tokenizer: pass a local gpt2.tiktoken "
            "or tokenizer.json (jaxbased-convert --tokenizer_file=...), or put one in the "
            "checkpoint folder"
        ) from error
