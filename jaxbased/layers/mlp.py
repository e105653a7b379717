"""Gated MLP (SwiGLU), docs/mixers/mlp.md: ``y, gate = split(fc1(x))``;
``out = fc2(y * act(gate))`` with ``act`` SiLU (SwiGLU) or none (TransNormerLLM's SGLU)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
from jaxtyping import Array, Float

from jaxbased.layers.common import Projection
from jaxbased.layers.mixer import MixerConfig, MixerContext, require_choice, require_positive_int

#: Gate activations of the gated MLP: ``silu`` (SwiGLU) or ``none`` (a bilinear GLU, SGLU).
MLP_ACTIVATIONS: tuple[str, ...] = ("silu", "none")


@dataclasses.dataclass(frozen=True)
class MLPConfig(MixerConfig):
    """The gated MLP of every block (when ``ModelConfig.use_mlp``) and of ``mlp`` layers.

    Attributes:
      inner_dim: hidden width before rounding (None: ``int(8 * d_model / 3)``).
      multiple_of: the hidden width is rounded up to a multiple of this.
      activation: the gate's activation, ``silu`` (SwiGLU) or ``none`` (``value * gate``,
        TransNormerLLM's SGLU).
    """

    inner_dim: int | None = 2048
    multiple_of: int = 256
    activation: str = "silu"

    def check(self) -> None:
        require_positive_int(self, "multiple_of")
        require_positive_int(self, "inner_dim", optional=True)
        require_choice(self, "activation", MLP_ACTIVATIONS)

    def hidden_dim(self, d_model: int) -> int:
        """Hidden width (``fc2``'s input; ``fc1`` outputs twice this)."""
        inner = self.inner_dim if self.inner_dim is not None else int(8 * d_model / 3)
        return -(-inner // self.multiple_of) * self.multiple_of


class GatedMLP(nn.Module):
    """Gated MLP without biases; ``fc1`` kernel ``[d, 2, n]`` (value half first, then gate)."""

    config: MLPConfig
    context: MixerContext

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        context = self.context
        hidden = self.config.hidden_dim(context.d_model)
        both = Projection(
            (context.d_model,),
            (2, hidden),
            ("embed", None, "mlp"),
            context.init_std,
            context.compute_dtype,
            name="fc1",
        )(x)
        value, gate = both[..., 0, :], both[..., 1, :]
        return Projection(
            (hidden,),
            (context.d_model,),
            ("mlp", "embed"),
            context.output_init_std,
            context.compute_dtype,
            name="fc2",
        )(value * (jax.nn.silu(gate) if self.config.activation == "silu" else gate))

    def flops(self, seq_len: int) -> float:
        """``fc1`` and ``fc2`` per token: ``6 * d * hidden`` (independent of ``seq_len``)."""
        del seq_len
        d = self.context.d_model
        return 6 * d * self.config.hidden_dim(d)
