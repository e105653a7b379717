"""Batches put on the devices one step ahead, each with the data iterator state that resumes
after it.

The training loop dispatches step ``n`` (asynchronously), then calls :meth:`DevicePrefetcher.
prefetch`: batch ``n + 1`` is read from the host iterator and its transfer to the devices starts
while step ``n`` runs. A checkpoint must record the iterator state after the last *consumed*
batch, not after the one fetched ahead, so every :class:`DeviceBatch` carries the iterator state
taken right after it was read: saving ``batch.data_state`` of the batch the last step trained on
resumes exactly where that step left off.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

from jaxbased.sharding import global_batch


class CheckpointableIterator(Protocol):
    """A batch iterator whose position can be saved (Grain's ``DatasetIterator``)."""

    def __next__(self) -> np.ndarray: ...

    def get_state(self) -> dict: ...


@dataclasses.dataclass(frozen=True)
class DeviceBatch:
    """One batch, on the host and on the devices.

    Attributes:
      host: this process's rows of the batch (as the iterator gave them).
      device: the global batch array, sharded over the devices.
      data_state: the iterator state right after this batch was read (where a run that has
        trained on this batch resumes).
    """

    host: Any
    device: Any
    data_state: dict


class DevicePrefetcher:
    """Reads batches from ``iterator`` and puts them on the devices one step ahead.

    ``put(host_batch) -> device array`` defaults to :func:`jaxbased.sharding.global_batch` over
    ``sharding`` (a host-to-device transfer, which JAX starts without waiting for it).
    """

    def __init__(
        self,
        iterator: CheckpointableIterator,
        sharding: jax.sharding.Sharding | None = None,
        *,
        put: Callable[[Any], Any] | None = None,
    ) -> None:
        if put is None:
            if sharding is None:
                raise ValueError("DevicePrefetcher needs a sharding or a put function")
            put = lambda batch: global_batch(batch, sharding)
        self._iterator = iterator
        self._put = put
        self._ahead: DeviceBatch | None = None

    def _read(self) -> DeviceBatch:
        host = next(self._iterator)
        data_state = copy.deepcopy(self._iterator.get_state())
        return DeviceBatch(host=host, device=self._put(host), data_state=data_state)

    def prefetch(self) -> None:
        """Read the next batch and start its transfer now (no-op if one is already waiting)."""
        if self._ahead is None:
            self._ahead = self._read()

    def next(self) -> DeviceBatch:
        """The batch fetched ahead, or (if none) the next one read now."""
        batch, self._ahead = self._ahead, None
        return batch if batch is not None else self._read()
