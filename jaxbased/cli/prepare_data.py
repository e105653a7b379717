"""``jaxbased-prepare-data``: tokenize text into a dataset directory for ``train.py``.

    jaxbased-prepare-data --output=data/mytext notes/ 'books/**/*.txt' extra.md
    jaxbased-prepare-data --output=data/bpe --tokenizer=bpe --bpe_vocab_size=4096 corpus/
    jaxbased-prepare-data --output=data/gpt2 --tokenizer=gpt2 --tokenizer_file=gpt2.tiktoken x.txt
    jaxbased-prepare-data --output=data/builtin --builtin        # the built-in corpus

Inputs are files, folders (searched recursively) and globs; ``hf:NAME[:SPLIT]`` streams a Hugging
Face dataset when online. Each file is one document. The dataset is written atomically; the
command prints its size, vocabulary and the ``train.py`` command that trains on it.
"""

from __future__ import annotations

import pathlib
import shlex
import tempfile

from absl import flags, logging

from jaxbased.cli import command, errors
from jaxbased.data.corpus import (
    HUGGING_FACE_PREFIX,
    Document,
    builtin_corpus_files,
    builtin_corpus_fingerprint,
    expand_inputs,
    read_documents,
)
from jaxbased.data.token_store import TokenDataset, write_token_dataset
from jaxbased.data.tokenizers import TOKENIZER_KINDS, ByteTokenizer, gpt2_tokenizer, train_bpe

_OUTPUT = flags.DEFINE_string("output", None, "dataset directory to create", required=True)
_TOKENIZER = flags.DEFINE_enum("tokenizer", "byte", list(TOKENIZER_KINDS), "tokenizer kind")
_TOKENIZER_FILE = flags.DEFINE_string(
    "tokenizer_file", None, "gpt2: a .tiktoken or tokenizer.json file (default: the hub)"
)
_BPE_VOCAB = flags.DEFINE_integer("bpe_vocab_size", 4096, "bpe: vocabulary size to train")
_VALIDATION = flags.DEFINE_float("validation_fraction", 0.02, "tail of the tokens held out")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output directory")
_BUILTIN = flags.DEFINE_bool("builtin", False, "use the built-in corpus instead of inputs")
_BUILTIN_BYTES = flags.DEFINE_integer("builtin_max_bytes", 4_000_000, "size of the built-in corpus")

MIN_BPE_VOCAB = 258  # 256 bytes, the end-of-text token and at least one merge


def check_flags(inputs: list[str]) -> None:
    """Usage errors for flags and inputs that cannot work, before anything is written."""
    output = pathlib.Path(_OUTPUT.value)
    if output.exists() and not _OVERWRITE.value:
        raise errors.UsageError(
            f"--output={output} already exists (pass --overwrite to replace it)"
        )
    if _BUILTIN.value and inputs:
        raise errors.UsageError(f"--builtin takes no inputs (got {' '.join(inputs)})")
    if not _BUILTIN.value and not inputs:
        raise errors.UsageError("give text files, folders or globs after the flags (or --builtin)")
    if not 0 <= _VALIDATION.value <= 0.5:
        raise errors.UsageError(f"--validation_fraction={_VALIDATION.value} must be in [0, 0.5]")
    if _TOKENIZER.value == "bpe" and _BPE_VOCAB.value < MIN_BPE_VOCAB:
        raise errors.UsageError(
            f"--bpe_vocab_size={_BPE_VOCAB.value} must be >= {MIN_BPE_VOCAB} (256 bytes, the "
            "end-of-text token and at least one merge)"
        )
    if _TOKENIZER_FILE.value is not None:
        if _TOKENIZER.value != "gpt2":
            raise errors.UsageError(
                f"--tokenizer_file is for --tokenizer=gpt2 (got --tokenizer={_TOKENIZER.value})"
            )
        if not pathlib.Path(_TOKENIZER_FILE.value).is_file():
            raise errors.UsageError(f"--tokenizer_file={_TOKENIZER_FILE.value}: no such file")
    local = [item for item in inputs if not item.startswith(HUGGING_FACE_PREFIX)]
    if local:
        expand_inputs(local)  # names an input that matches no text file


def summary(dataset: TokenDataset, data_flag: str) -> str:
    """What was written and the ``train.py`` command that trains on it."""
    metadata = dataset.metadata
    train_start, train_end = metadata["splits"]["train"]
    validation_start, validation_end = metadata["splits"]["validation"]
    vocab_size = metadata["vocab_size"]
    return (
        f"wrote {data_flag}: {metadata['num_documents']:,} documents, "
        f"{metadata['num_tokens']:,} tokens ({train_end - train_start:,} train, "
        f"{validation_end - validation_start:,} validation), tokenizer "
        f"{metadata['tokenizer']['kind']} with vocab_size {vocab_size}\n"
        "train on it: .venv/bin/python train.py --config=configs/demo.py "
        f"--config.data.path={shlex.quote(data_flag)} --config.model.vocab_size={vocab_size} "
        f"--workdir=workdirs/{shlex.quote(pathlib.Path(data_flag).name)}"
    )


def main(argv: list[str]) -> None:
    inputs = argv[1:]
    check_flags(inputs)
    extra = {}
    if _BUILTIN.value:
        files = builtin_corpus_files(_BUILTIN_BYTES.value)
        inputs = [str(p) for p in files]
        extra = {"builtin_fingerprint": builtin_corpus_fingerprint(files)}

    def documents():
        return read_documents(inputs)

    with tempfile.TemporaryDirectory(prefix="jaxbased-bpe-") as scratch:
        if _TOKENIZER.value == "byte":
            tokenizer = ByteTokenizer()
        elif _TOKENIZER.value == "gpt2":
            tokenizer = gpt2_tokenizer(_TOKENIZER_FILE.value)
        else:
            logging.info("training a byte-level BPE with %d ids", _BPE_VOCAB.value)
            texts = (document.text for document in documents())
            tokenizer = train_bpe(texts, _BPE_VOCAB.value, pathlib.Path(scratch) / "tokenizer.json")
        output = write_token_dataset(
            (Document(d.source, d.text) for d in documents()),
            tokenizer,
            _OUTPUT.value,
            validation_fraction=_VALIDATION.value,
            overwrite=_OVERWRITE.value,
            extra_metadata=extra,
        )
    print(summary(TokenDataset.open(output), _OUTPUT.value), flush=True)


COMMAND = command.Command(
    name="jaxbased-prepare-data",
    summary="tokenize text files, folders, globs or a Hugging Face dataset into a dataset "
    "directory that train.py reads (--config.data.path)",
    usage="jaxbased-prepare-data --output=DIR [flags] INPUT... (files, folders, globs, "
    "hf:NAME[:SPLIT])",
    examples=(
        "jaxbased-prepare-data --output=data/mytext notes/ 'books/**/*.txt' extra.md",
        "jaxbased-prepare-data --output=data/bpe --tokenizer=bpe --bpe_vocab_size=8192 corpus/",
        "jaxbased-prepare-data --output=data/gpt2 --tokenizer=gpt2 "
        "--tokenizer_file=gpt2.tiktoken corpus/",
        "jaxbased-prepare-data --output=data/builtin --builtin",
    ),
    notes="Each file is one document, followed by an end-of-document token. The output (a "
    "zarr array of token ids, the document starts, the tokenizer and metadata.json) is "
    "written into a temporary directory and renamed when complete. The command prints the "
    "vocabulary size and the train.py command to use.",
    groups=(
        ("output", ("output", "overwrite", "validation_fraction")),
        ("tokenizer", ("tokenizer", "tokenizer_file", "bpe_vocab_size")),
        ("built-in corpus", ("builtin", "builtin_max_bytes")),
    ),
    required=("output",),
)


def run() -> None:
    """Console-script entry point."""
    command.run(main, COMMAND)


if __name__ == "__main__":
    run()
