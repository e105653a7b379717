"""An MLP as a layer's mixer: the ``-`` layers of NVIDIA's Mamba-2-Hybrid pattern.

NVIDIA's hybrids (Waleffe et al. 2024) stack single-sublayer blocks, each a norm and one of
Mamba-2, attention or MLP, added to the residual. In jaxbased that is a layer pattern with
``use_mlp=False`` whose ``mlp`` entries are this mixer: the gated MLP of docs/mixers/mlp.md
(parameters ``fc1``, ``fc2`` as :class:`~jaxbased.layers.mlp.GatedMLP`, sized by the model's
``mlp`` section). It mixes channels only, so its cache is an :class:`EmptyCache`.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from jaxbased.layers.mixer import EmptyCache, StateSizeFromCache
from jaxbased.layers.mlp import GatedMLP


class MLPMixer(StateSizeFromCache, GatedMLP):
    """Gated MLP with the mixer interface (``prefill``, ``decode_step``, an empty cache)."""

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], EmptyCache]:
        """Forward; the cache is empty (``max_len`` and ``lengths`` change nothing)."""
        del max_len, lengths
        return self(x), EmptyCache()

    def decode_step(
        self, x: Float[Array, "B D"], cache: EmptyCache, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], EmptyCache]:
        """One token per row (the MLP acts on the last axis only)."""
        del position
        return self(x), cache

    def init_cache(self, batch_size: int, max_len: int) -> EmptyCache:
        del batch_size, max_len
        return EmptyCache()
