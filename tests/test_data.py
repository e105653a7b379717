import base64
import json
import pathlib

import numpy as np
import pytest

from jaxbased.data import (
    ByteTokenizer,
    Document,
    TiktokenTokenizer,
    TokenDataset,
    TokenWindows,
    expand_inputs,
    load_tokenizer,
    make_iterator,
    read_documents,
    train_bpe,
    training_batches,
    validation_batches,
    write_token_dataset,
)
from jaxbased.data.corpus import builtin_corpus_files

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def write_dataset(tmp_path, texts, name="ds", **kwargs) -> TokenDataset:
    documents = [Document(f"doc{i}", text) for i, text in enumerate(texts)]
    path = write_token_dataset(
        documents, ByteTokenizer(), tmp_path / name, progress=False, **kwargs
    )
    return TokenDataset.open(path)


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tokenizer.encode(text)
    assert max(ids) < 256 and tokenizer.decode([*ids, tokenizer.eos_id]) == text


def test_bpe_trains_saves_and_reloads(tmp_path):
    tokenizer = train_bpe([TEXT] * 5, 300, tmp_path / "tokenizer.json")
    ids = tokenizer.encode(TEXT)
    assert len(ids) < len(TEXT.encode()) / 2  # merges learned
    assert tokenizer.decode(ids) == TEXT
    target = tmp_path / "copy"
    target.mkdir()
    tokenizer.save(target)
    reloaded = load_tokenizer(tokenizer.spec(), target)
    assert reloaded.encode(TEXT) == ids and reloaded.vocab_size == tokenizer.vocab_size


def test_tiktoken_rank_file_is_read_offline(tmp_path):
    # A tiny rank file in tiktoken's format: base64 token, rank. Bytes first, then merges.
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the"]
    rank_file = tmp_path / "tiny.tiktoken"
    rank_file.write_text(
        "\n".join(f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(ranks))
    )
    tokenizer = TiktokenTokenizer(rank_file)
    assert tokenizer.vocab_size == 260 and tokenizer.eos_id == 259
    ids = tokenizer.encode("the theme")
    assert ids[0] == 257  # "the"
    assert tokenizer.decode(ids) == "the theme"


def test_dataset_layout_and_metadata(tmp_path):
    dataset = write_dataset(tmp_path, ["abc", "", "defgh"], validation_fraction=0.25)
    metadata = dataset.metadata
    assert metadata["num_documents"] == 2 and metadata["num_tokens"] == 4 + 6
    tokens = np.concatenate([dataset.tokens("train"), dataset.tokens("validation")])
    np.testing.assert_array_equal(tokens, [97, 98, 99, 256, 100, 101, 102, 103, 104, 256])
    np.testing.assert_array_equal(dataset.document_starts(), [0, 4])
    assert metadata["splits"]["validation"] == [8, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary leftovers


def test_empty_corpus_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="the corpus is empty"):
        write_dataset(tmp_path, ["", ""])
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    write_dataset(tmp_path, ["first"])
    with pytest.raises(ValueError, match="already exists"):
        write_dataset(tmp_path, ["second"])
    dataset = write_dataset(tmp_path, ["second!"], overwrite=True)
    assert dataset.num_tokens == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_inputs_expand_files_folders_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "c.bin").write_bytes(b"\0\1\2")
    files = expand_inputs([str(tmp_path / "sub"), str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
    assert [p.name for p in files] == ["b.md", "a.txt"]
    assert [d.text for d in read_documents([str(tmp_path / "a.txt")])] == ["alpha"]
    with pytest.raises(ValueError, match="matches no text file"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="inputs is empty"):
        expand_inputs([])


def test_builtin_corpus_is_the_standard_library():
    files = builtin_corpus_files(200_000)
    assert files and all(p.suffix == ".py" for p in files)
    assert sum(p.stat().st_size for p in files) >= 200_000
    assert not any("test" in p.parts or "site-packages" in p.parts for p in files)


def test_windows_batches_and_resumable_iterator(tmp_path):
    dataset = write_dataset(tmp_path, [TEXT], validation_fraction=0.1)
    windows = TokenWindows(dataset.tokens("train"), 16)
    train_tokens = dataset.tokens("train")
    np.testing.assert_array_equal(windows[3], train_tokens[48:65])
    batches = training_batches(dataset, seq_len=16, batch_size=4, seed=7)
    iterator = make_iterator(batches)
    first = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    following = [next(iterator) for _ in range(4)]
    assert first[0].shape == (4, 17) and first[0].dtype == np.int32
    again = make_iterator(training_batches(dataset, seq_len=16, batch_size=4, seed=7))
    np.testing.assert_array_equal(next(again), first[0])  # same seed, same order
    resumed = make_iterator(batches)
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives JSON
    for want in following:
        np.testing.assert_array_equal(next(resumed), want)
    other_seed = make_iterator(training_batches(dataset, seq_len=16, batch_size=4, seed=8))
    assert not np.array_equal(next(other_seed), first[0])


def test_processes_split_each_global_batch(tmp_path):
    letters = np.random.default_rng(0).choice(list("abcdefghij"), size=400)
    dataset = write_dataset(tmp_path, ["".join(letters)])
    whole = make_iterator(training_batches(dataset, seq_len=8, batch_size=4, seed=3))
    parts = [
        make_iterator(
            training_batches(
                dataset, seq_len=8, batch_size=4, seed=3, process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    for _ in range(12):  # more than one epoch of the 49 windows
        local = [next(part) for part in parts]
        assert local[0].shape == (2, 9)
        np.testing.assert_array_equal(np.concatenate(local), next(whole))
    with pytest.raises(ValueError, match="batch_size=3 must be divisible by the 2 processes"):
        training_batches(dataset, seq_len=8, batch_size=3, seed=0, process_count=2)


def test_bad_data_arguments(tmp_path):
    dataset = write_dataset(tmp_path, ["short text"])
    with pytest.raises(ValueError, match="seq_len=64 is longer than the data"):
        training_batches(dataset, seq_len=64, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="not a prepared dataset"):
        TokenDataset.open(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="the validation split has 1 tokens"):
        validation_batches(dataset, seq_len=2, batch_size=1, max_batches=2)
    bigger = write_dataset(tmp_path, [TEXT], name="bigger", validation_fraction=0.1)
    validation = validation_batches(bigger, seq_len=8, batch_size=3, max_batches=2)
    assert [batch.shape for batch in validation] == [(3, 9), (3, 9)]


def test_prepare_data_cli(tmp_path):
    import subprocess
    import sys

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "one.txt").write_text(TEXT)
    (tmp_path / "two.md").write_text("second document")
    output = tmp_path / "prepared"
    command = [
        sys.executable,
        "-m",
        "jaxbased.cli.prepare_data",
        f"--output={output}",
        "--tokenizer=bpe",
        "--bpe_vocab_size=280",
        str(tmp_path / "notes"),
        str(tmp_path / "*.md"),
    ]
    subprocess.run(command, check=True, capture_output=True, cwd=pathlib.Path(__file__).parents[1])
    dataset = TokenDataset.open(output)
    assert dataset.metadata["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json"}
    assert dataset.metadata["num_documents"] == 2 and dataset.vocab_size == 280
    tokenizer = dataset.tokenizer()
    tokens = dataset.tokens("train")
    assert tokenizer.decode(tokens[: len(tokenizer.encode(TEXT))]) == TEXT
