"""Gated MLP (SwiGLU), SPEC.md §1: ``y, gate = split(fc1(x))``; ``out = fc2(y * silu(gate))``."""

from __future__ import annotations

import flax.linen as nn
import jax
from jaxtyping import Array, Float

from jaxbased.config import ModelConfig
from jaxbased.layers.common import Projection


class GatedMLP(nn.Module):
    """Gated MLP without biases; ``fc1`` kernel ``[d, 2, n]`` (value half first, then gate)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        config = self.config
        hidden = config.mlp_hidden_dim
        both = Projection(
            (config.d_model,),
            (2, hidden),
            ("embed", None, "mlp"),
            config.init_std,
            config.compute_dtype,
            name="fc1",
        )(x)
        value, gate = both[..., 0, :], both[..., 1, :]
        return Projection(
            (hidden,),
            (config.d_model,),
            ("mlp", "embed"),
            config.output_init_std,
            config.compute_dtype,
            name="fc2",
        )(value * jax.nn.silu(gate))
