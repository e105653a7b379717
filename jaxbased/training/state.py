"""The train state: step, float32 parameters and optimizer state, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int


@flax.struct.dataclass
class TrainState:
    step: Int[Array, ""]
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, optimizer) -> TrainState:
        params = jax.tree.map(
            lambda p: jnp.array(p, jnp.float32), params
        )  # a copy: state is donated
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
