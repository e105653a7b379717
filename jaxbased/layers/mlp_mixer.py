"""An MLP as a layer's mixer: the ``-`` layers of NVIDIA's Mamba-2-Hybrid pattern.

NVIDIA's hybrids (Waleffe et al. 2024) stack single-sublayer blocks, each a norm and one of
Mamba-2, attention or MLP, added to the residual. In jaxbased that is a layer pattern with
``use_mlp=False`` whose ``mlp`` entries are this mixer: the gated MLP of SPEC.md §1 (parameters
``fc1``, ``fc2`` as :class:`~jaxbased.layers.mlp.GatedMLP`). It mixes channels only, so its
cache is empty.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from jaxbased.layers.mlp import GatedMLP


class MLPMixer(GatedMLP):
    """Gated MLP with the mixer interface (``prefill``, ``decode``, an empty cache ``()``)."""

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], tuple[()]]:
        """Forward; the cache is empty (``max_len`` and ``lengths`` change nothing)."""
        del max_len, lengths
        return self(x), ()

    def decode(
        self, x: Float[Array, "B D"], cache: tuple[()], position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], tuple[()]]:
        """One token per row (the MLP acts on the last axis only)."""
        del position
        return self(x), cache

    def init_cache(self, batch_size: int, max_len: int) -> tuple[()]:
        del batch_size, max_len
        return ()
