"""``jaxbased-prepare-data``: tokenize text into a dataset directory for ``train.py``.

    jaxbased-prepare-data --output=data/mytext notes/ 'books/**/*.txt' extra.md
    jaxbased-prepare-data --output=data/bpe --tokenizer=bpe --bpe_vocab_size=4096 corpus/
    jaxbased-prepare-data --output=data/gpt2 --tokenizer=gpt2 --tokenizer_file=gpt2.tiktoken x.txt
    jaxbased-prepare-data --output=data/builtin --builtin        # the built-in corpus

Inputs are files, folders (searched recursively) and globs; ``hf:NAME[:SPLIT]`` streams a Hugging
Face dataset when online. Each file is one document. The dataset is written atomically.
"""

from __future__ import annotations

import pathlib
import tempfile

from absl import app, flags, logging

from jaxbased.cli.logging_setup import configure_logging
from jaxbased.data.corpus import (
    Document,
    builtin_corpus_files,
    builtin_corpus_fingerprint,
    read_documents,
)
from jaxbased.data.token_store import write_token_dataset
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


def main(argv: list[str]) -> None:
    inputs = argv[1:]
    extra = {}
    if _BUILTIN.value:
        if inputs:
            raise app.UsageError("--builtin takes no inputs")
        files = builtin_corpus_files(_BUILTIN_BYTES.value)
        inputs = [str(p) for p in files]
        extra = {"builtin_fingerprint": builtin_corpus_fingerprint(files)}
    if not inputs:
        raise app.UsageError("give text files, folders or globs (or --builtin)")

    def documents():
        return read_documents(inputs)

    if _TOKENIZER.value == "byte":
        tokenizer = ByteTokenizer()
    elif _TOKENIZER.value == "gpt2":
        tokenizer = gpt2_tokenizer(_TOKENIZER_FILE.value)
    else:
        logging.info("training a byte-level BPE with %d ids", _BPE_VOCAB.value)
        scratch = pathlib.Path(tempfile.mkdtemp(prefix="jaxbased-bpe-"))
        texts = (document.text for document in documents())
        tokenizer = train_bpe(texts, _BPE_VOCAB.value, scratch / "tokenizer.json")
    output = write_token_dataset(
        (Document(d.source, d.text) for d in documents()),
        tokenizer,
        _OUTPUT.value,
        validation_fraction=_VALIDATION.value,
        overwrite=_OVERWRITE.value,
        extra_metadata=extra,
    )
    logging.info("wrote %s", output)


def run() -> None:
    """Console-script entry point."""
    configure_logging()
    app.run(main)


if __name__ == "__main__":
    run()
