"""Data: tokenizers, text sources, the on-disk token store and the Grain input pipeline."""

from jaxbased.data.corpus import Document, builtin_corpus_files, expand_inputs, read_documents
from jaxbased.data.pipeline import (
    TokenWindows,
    make_iterator,
    training_batches,
    validation_batches,
)
from jaxbased.data.token_store import TokenDataset, write_token_dataset
from jaxbased.data.tokenizers import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    TiktokenTokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "ByteTokenizer",
    "Document",
    "HuggingFaceTokenizer",
    "TiktokenTokenizer",
    "TokenDataset",
    "TokenWindows",
    "builtin_corpus_files",
    "expand_inputs",
    "gpt2_tokenizer",
    "load_tokenizer",
    "make_iterator",
    "read_documents",
    "train_bpe",
    "training_batches",
    "validation_batches",
    "write_token_dataset",
]
