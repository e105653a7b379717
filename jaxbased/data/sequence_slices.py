"""Token batches split over the rows *and* the time slices of a mesh (docs/sequence_parallelism.md).

A language-model batch of ``B`` windows of ``T + 1`` tokens (inputs ``[:, :-1]``, next-token
targets ``[:, 1:]``) cannot be split into ``n`` equal time slices: ``T + 1`` tokens do not
divide, and slice ``s``'s targets start one token into slice ``s + 1``. So with ``n`` slices of
``L = T / n`` tokens the batch is laid out as **slice windows**, ``[B, n (L + 1)]`` int32: slice
``s`` of a row is tokens ``s L .. s L + L`` of its window, its ``L`` inputs followed by the
first token of the next slice, which is its last target. Slice ``s`` then holds exactly the
inputs and targets of tokens ``s L .. (s + 1) L - 1``, the targets are built before the split,
and no token crosses a device boundary in the step. With ``n = 1`` the layout is the window
itself, ``[B, T + 1]``.

A process feeds only the rows and slices its devices hold (a :class:`BatchPiece`, found from the
batch's sharding by :func:`process_piece`), and :func:`assemble_global_batch` places each
device's block of the piece on it. :func:`next_token_pairs` turns the global array back into
``(inputs, targets)`` inside the jitted step, a reshape that keeps every slice on its device.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jaxtyping import Array, Int


@dataclasses.dataclass(frozen=True)
class BatchPiece:
    """The part of every global token batch that one process reads and feeds to its devices.

    Attributes:
      row_start, row_stop: the global batch rows ``row_start .. row_stop - 1``.
      slice_start, slice_stop: the time slices ``slice_start .. slice_stop - 1`` of each row.
      num_slices: how many slices a row has (the mesh's ``sequence`` size).

    On the host the piece is ``[row_stop - row_start, (slice_stop - slice_start) (L + 1)]``
    int32: the slice windows of those slices (module docstring).
    """

    row_start: int
    row_stop: int
    slice_start: int
    slice_stop: int
    num_slices: int

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def slices(self) -> int:
        return self.slice_stop - self.slice_start

    @classmethod
    def rows_of_process(cls, batch_size: int, process_index: int, process_count: int):
        """Process ``process_index``'s contiguous share of the rows, whole sequences (one
        slice): the layout of a mesh without a ``sequence`` axis."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} outside 0..{process_count - 1}")
        if batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by the {process_count} processes"
            )
        local = batch_size // process_count
        return cls(process_index * local, (process_index + 1) * local, 0, 1, 1)

    def check(self, batch_size: int, seq_len: int) -> None:
        """Raise ``ValueError`` unless the piece lies inside a ``[batch_size, seq_len]`` batch
        whose sequences split into ``num_slices`` whole slices."""
        if self.num_slices < 1 or seq_len % self.num_slices:
            raise ValueError(
                f"num_slices={self.num_slices} must be >= 1 and divide seq_len={seq_len}"
            )
        if not 0 <= self.row_start < self.row_stop <= batch_size:
            raise ValueError(
                f"piece rows {self.row_start}..{self.row_stop - 1} outside the batch's "
                f"0..{batch_size - 1}"
            )
        if not 0 <= self.slice_start < self.slice_stop <= self.num_slices:
            raise ValueError(
                f"piece slices {self.slice_start}..{self.slice_stop - 1} outside "
                f"0..{self.num_slices - 1}"
            )


def slice_window_positions(seq_len: int, num_slices: int, first: int, count: int) -> np.ndarray:
    """Token positions (int64, ``[count (L + 1)]``) in a ``T + 1``-token window of slices
    ``first .. first + count - 1``: slice ``s`` reads ``s L .. s L + L``."""
    length = seq_len // num_slices
    starts = np.arange(first, first + count) * length
    return (starts[:, None] + np.arange(length + 1)[None, :]).reshape(-1)


def slice_windows(windows: Int[np.ndarray, "B W"], num_slices: int) -> Int[np.ndarray, "B S"]:
    """``[B, T + 1]`` windows as ``[B, n (L + 1)]`` slice windows (``n = num_slices``).

    Raises ``ValueError`` when ``T`` does not split into ``num_slices`` whole slices.
    """
    seq_len = windows.shape[-1] - 1
    if num_slices < 1 or seq_len % num_slices:
        raise ValueError(
            f"num_slices={num_slices} must be >= 1 and divide the windows' {seq_len} tokens"
        )
    return windows[:, slice_window_positions(seq_len, num_slices, 0, num_slices)]


def next_token_pairs(
    batch: Int[Array, "B S"], num_slices: int
) -> tuple[Int[Array, "B T"], Int[Array, "B T"]]:
    """``(inputs, targets)``, both ``[B, T]``, of ``[B, n (L + 1)]`` slice windows.

    ``T = n L``; with ``n = 1`` these are ``batch[:, :-1]`` and ``batch[:, 1:]``. The split of
    the time axis into ``(n, L + 1)`` and the merge of ``(n, L)`` keep the slices where the
    ``sequence`` axis put them: inside a jitted step sharded over it, nothing moves.
    """
    rows, width = batch.shape
    if num_slices < 1 or width % num_slices or width // num_slices < 2:
        raise ValueError(
            f"a batch of width {width} is not {num_slices} slice windows of L + 1 >= 2 tokens"
        )
    per_slice = batch.reshape(rows, num_slices, width // num_slices)
    inputs = per_slice[:, :, :-1].reshape(rows, -1)
    targets = per_slice[:, :, 1:].reshape(rows, -1)
    return inputs, targets


def _span(index: slice, size: int) -> tuple[int, int]:
    start, stop, _ = index.indices(size)
    return start, stop


def process_piece(
    sharding: jax.sharding.Sharding,
    batch_size: int,
    seq_len: int,
    num_slices: int,
    process_index: int | None = None,
    process_of: Callable[[Any], int] | None = None,
) -> BatchPiece:
    """The rows and slices of a ``[batch_size, n (L + 1)]`` slice-window batch that the devices
    of one process hold under ``sharding`` (the time axis may be split over ``sequence`` only
    at slice boundaries).

    ``process_index`` defaults to this process; ``process_of(device)`` (default
    ``device.process_index``) says which process a device belongs to, so that tests can pretend
    several. Raises ``ValueError`` when the process holds no device, or blocks that are not one
    box of rows x slices (a mesh whose axes interleave processes).
    """
    process_of = process_of or (lambda device: device.process_index)
    process_index = jax.process_index() if process_index is None else process_index
    width = num_slices * (seq_len // num_slices + 1)
    blocks = {
        (_span(index[0], batch_size), _span(index[1], width))
        for device, index in sharding.devices_indices_map((batch_size, width)).items()
        if process_of(device) == process_index
    }
    if not blocks:
        raise ValueError(f"process {process_index} holds no device of the batch's sharding")
    rows = sorted({block[0] for block in blocks})
    columns = sorted({block[1] for block in blocks})
    slice_width = width // num_slices
    contiguous = all(
        a[1] == b[0] for pairs in (rows, columns) for a, b in itertools.pairwise(pairs)
    )
    if not contiguous or len(blocks) != len(rows) * len(columns):
        raise ValueError(
            f"process {process_index}'s devices hold batch blocks {sorted(blocks)}, not one box "
            "of rows x time slices; order the mesh so that each process's devices are adjacent"
        )
    if columns[0][0] % slice_width or columns[-1][1] % slice_width:
        raise ValueError(
            f"the sharding splits the time axis inside a slice of {slice_width} tokens "
            f"(columns {columns}); split it over the {num_slices} slices only"
        )
    return BatchPiece(
        row_start=rows[0][0],
        row_stop=rows[-1][1],
        slice_start=columns[0][0] // slice_width,
        slice_stop=columns[-1][1] // slice_width,
        num_slices=num_slices,
    )


def assemble_global_batch(
    sharding: jax.sharding.Sharding,
    global_shape: tuple[int, int],
    pieces: Mapping[int, tuple[BatchPiece, np.ndarray]],
    process_of: Callable[[Any], int] | None = None,
) -> jax.Array:
    """The global ``[B, n (L + 1)]`` batch array from the pieces the processes read.

    ``pieces`` maps a process index to its :class:`BatchPiece` and host array; a real run
    passes only its own (every device of this process takes its block from it), a test with a
    pretended ``process_of`` passes one per pretended process. Each device's block is cut from
    the piece of the process it belongs to and transferred asynchronously.
    """
    process_of = process_of or (lambda device: device.process_index)
    num_slices = next(iter(pieces.values()))[0].num_slices
    slice_width = global_shape[1] // num_slices
    device_arrays = []
    for device, index in sharding.addressable_devices_indices_map(global_shape).items():
        piece, host = pieces[process_of(device)]
        row_start, row_stop = _span(index[0], global_shape[0])
        column_start, column_stop = _span(index[1], global_shape[1])
        offset = piece.slice_start * slice_width
        block = host[
            row_start - piece.row_start : row_stop - piece.row_start,
            column_start - offset : column_stop - offset,
        ]
        device_arrays.append(jax.device_put(np.ascontiguousarray(block), device))
    return jax.make_array_from_single_device_arrays(global_shape, sharding, device_arrays)


def global_batch_from_host(batch: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global batch that every process holds whole on the host (the validation batches),
    each device taking its own block."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
