"""Grain input pipeline over a tokenized dataset.

Training windows are ``seq_len + 1`` consecutive tokens starting every ``seq_len`` tokens of the
train split (inputs are the first ``seq_len``, targets the last ``seq_len``). They are shuffled
with the seed (reshuffled every epoch), repeated forever and cut into global batches; each JAX
process reads only its own part of each global batch: its rows, and with a mesh that splits the
time axis (``sequence``) only its time slices of them, as slice windows
(:mod:`jaxbased.data.sequence_slices`). The iterator's state (``get_state`` /
``set_state``, a small dict) is saved with the model checkpoint, so that a resumed run sees
exactly the batches it would have.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxbased.data.sequence_slices import BatchPiece, slice_window_positions
from jaxbased.data.token_store import TokenDataset


class TokenWindows:
    """Random-access windows: item ``i`` is ``tokens[i * seq_len : (i + 1) * seq_len + 1]``."""

    def __init__(self, tokens: Any, seq_len: int, split_name: str = "train") -> None:
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} must be a positive integer")
        length = int(tokens.shape[0])
        if length < seq_len + 1:
            raise ValueError(
                f"seq_len={seq_len} is longer than the data: the {split_name} split has {length} "
                f"tokens and a window needs seq_len + 1 = {seq_len + 1}"
            )
        self.tokens, self.seq_len = tokens, seq_len
        self.num_windows = (length - 1) // seq_len

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read(index, 0, self.seq_len + 1)

    def read(self, index: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``start .. stop - 1`` of window ``index`` (int32), read alone from the store."""
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window index {index} outside 0..{self.num_windows - 1}")
        if not 0 <= start < stop <= self.seq_len + 1:
            raise IndexError(f"tokens {start}..{stop - 1} outside the window's 0..{self.seq_len}")
        offset = index * self.seq_len
        window = self.tokens[offset + start : offset + stop]
        if not isinstance(window, np.ndarray):  # a TensorStore view
            window = window.read().result()
        return np.asarray(window, np.int32)


class PieceWindows:
    """Random-access slice windows of one :class:`BatchPiece`'s slices: item ``i`` is
    ``[slices (L + 1)]`` int32, slices ``slice_start .. slice_stop - 1`` of window ``i`` (each
    its ``L`` tokens and the next one), read as one span of ``slices L + 1`` tokens."""

    def __init__(self, windows: TokenWindows, piece: BatchPiece) -> None:
        self.windows, self.piece = windows, piece
        length = windows.seq_len // piece.num_slices
        self.span = (piece.slice_start * length, piece.slice_stop * length + 1)
        positions = slice_window_positions(
            windows.seq_len, piece.num_slices, piece.slice_start, piece.slices
        )
        self.positions = positions - self.span[0]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.windows.read(index, *self.span)[self.positions]


def training_batches(
    dataset: TokenDataset,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    piece: BatchPiece | None = None,
) -> grain.MapDataset:
    """This process's part (int32) of every global batch.

    The global stream is the same for any number of processes: all windows, shuffled with
    ``seed`` (reshuffled every epoch), repeated, cut into global batches of ``batch_size``.
    Without a ``piece``, process ``p`` reads rows ``p * R .. (p + 1) * R - 1`` of each
    (``R = batch_size / process_count``) whole: ``[R, seq_len + 1]`` windows. With a ``piece``
    (:func:`jaxbased.data.sequence_slices.process_piece`) it reads the piece's rows and, of
    each, only the tokens of the piece's time slices: ``[rows, slices (L + 1)]`` slice windows
    (``L = seq_len / num_slices``). Either way the processes together see exactly the batches
    one process would.
    """
    if piece is None:
        piece = BatchPiece.rows_of_process(batch_size, process_index, process_count)
    piece.check(batch_size, seq_len)
    windows = TokenWindows(dataset.tokens("train"), seq_len, "train")
    source = windows if piece.num_slices == 1 else PieceWindows(windows, piece)
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    local, offset = piece.rows, piece.row_start

    def global_position(index: int) -> int:
        return (index // local) * batch_size + offset + index % local

    rows = grain.MapDataset.range(0, 1 << 50).map(lambda index: stream[global_position(index)])
    return rows.batch(local, drop_remainder=True)


def make_iterator(
    batches: grain.MapDataset, *, prefetch_threads: int = 2, prefetch_batches: int = 4
) -> grain.DatasetIterator:
    """A checkpointable iterator that reads ahead on ``prefetch_threads`` threads."""
    options = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=prefetch_batches)
    return iter(batches.to_iter_dataset(options))


def validation_batches(
    dataset: TokenDataset, *, seq_len: int, batch_size: int, max_batches: int
) -> list[np.ndarray]:
    """The first ``max_batches`` batches of validation windows, in order (the same every time).

    Raises ``ValueError`` if the validation split is too short for one window.
    """
    windows = TokenWindows(dataset.tokens("validation"), seq_len, "validation")
    count = min(len(windows), max_batches * batch_size)
    rows = [windows[i] for i in range(count)]
    batches = [np.stack(rows[i : i + batch_size]) for i in range(0, count, batch_size)]
    return [batch for batch in batches if len(batch) == batch_size] or [np.stack(rows)]
