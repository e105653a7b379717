"""MQAR models: the 2-layer Zoology setup built from the language model's own code.

Zoology's MQAR models (HazyResearch/zoology, ``arxiv24_based_figure2``) have two blocks whose
sequence mixer is a "hybrid" that picks, by layer index, BaseConv (kernel 3) for layer 0 and the
mixer under test for layer 1; no MLP (an identity state mixer), LayerNorm, no position
embedding, one head. Here that is ``LanguageModel`` with ``layer_pattern=("base_conv", mixer)``,
``use_mlp=False``, ``norm="layernorm"``, one head, and:

- rotary off (``rotary_fraction=0``): Zoology's attention and sliding-window mixers have no
  positional encoding at all (the short conv of layer 0 carries the order); keep it off for
  fidelity, or turn it on with an override;
- BASED with the symmetric Taylor map (``taylor_symmetric``): the same kernel as Zoology's
  ``taylor_exp`` with ``1 + F + F (F + 1) / 2`` features, the ``E`` of docs/mqar.md#state-size.

Mamba and Mamba-2 are the exception, as in Zoology, whose state-space MQAR models are its
"MambaBlock" language models: two blocks of the mixer itself (no BaseConv: the mixer's own short
conv carries the order), RMSNorm (Zoology's final norm is a LayerNorm; here every norm is the
same RMSNorm, as in mamba_ssm's language model), no MLP (``STATE_SPACE_MIXERS``).

Known differences from Zoology that the task does not depend on: our BaseConv is BASED's gated
short conv (docs/mixers/base_conv.md; Zoology's MQAR BaseConv is ``conv(u) * linear(u) + u``),
our attention projections have no biases, and Zoology's identity state mixer adds ``norm2(x)`` to
the residual where ``use_mlp=False`` adds nothing.

State size (the x axis of the paper's figure) is each mixer's own count, ``Mixer.state_size``: the
floating-point numbers of its decode cache, carried from token to token, per sequence, summed
over the layers that run the mixer under test (the last layer, or both where both are it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.config import MIXER_NAMES, ModelConfig, ModelFields
from jaxbased.layers.registry import MIXERS
from jaxbased.model import LanguageModel, layer_mixer

#: Fields every MQAR model sets (the Zoology setup), by section; overrides may change any of them
#: except ``num_layers`` and ``layer_pattern``.
MQAR_DEFAULTS: dict[str, Any] = dict(
    num_layers=2,
    use_mlp=False,
    norm="layernorm",
    pad_vocab_size_multiple=1,
    base_conv=dict(kernel_size=3),
    based=dict(heads=1, feature_dim=16, feature_map="taylor_symmetric", chunk_size=64),
    sliding_window=dict(heads=1, rotary_fraction=0.0),
    attention=dict(heads=1, rotary_fraction=0.0),
    decay_attention=dict(chunk_size=64),
)
#: Mixers whose MQAR model is two blocks of the mixer itself with RMSNorm (Zoology's
#: state-space MQAR model), not BaseConv then the mixer.
STATE_SPACE_MIXERS: tuple[str, ...] = ("mamba", "mamba2")
_MODEL_FIELDS = frozenset(field.name for field in dataclasses.fields(ModelFields))


def mqar_model_config(
    mixer: str, *, d_model: int, vocab_size: int = 8192, **overrides: Any
) -> ModelConfig:
    """The 2-layer MQAR model: BaseConv, then ``mixer`` (any name in ``MIXER_NAMES``); for the
    ``STATE_SPACE_MIXERS`` two ``mixer`` layers with RMSNorm (``mqar_layer_pattern``).

    ``overrides`` name model-level fields (``use_mlp``), fields of the mixer under test's
    section (``feature_dim`` for ``based``, ``window`` for ``sliding_window``, ``state_dim`` for
    ``mamba``, ...) or any section's field as ``"section.field"``; ``mixer="base_conv"`` gives
    two BaseConv layers. Raises ``ValueError`` for an unknown mixer or field, or an invalid
    value.
    """
    if mixer not in MIXER_NAMES:
        raise ValueError(f"mixer={mixer!r} is not known; allowed: {MIXER_NAMES}")
    for fixed in ("num_layers", "layer_pattern"):
        if fixed in overrides:
            raise ValueError(
                f"{fixed}={overrides[fixed]!r} cannot be overridden: an MQAR model is "
                f"{mqar_layer_pattern(mixer)}"
            )
    values: dict[str, Any] = {
        key: dict(value) if isinstance(value, dict) else value
        for key, value in MQAR_DEFAULTS.items()
    }
    if mixer in STATE_SPACE_MIXERS:
        values["norm"] = "rmsnorm"
    mixer_fields = {field.name for field in dataclasses.fields(MIXERS[mixer].config_type)}
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        if not section and key in _MODEL_FIELDS:
            values[key] = value
            continue
        section = section or mixer
        if section not in MIXERS or (section == mixer and field not in mixer_fields):
            raise ValueError(
                f"{key}={value!r} is neither a model field ({sorted(_MODEL_FIELDS)}), a field of "
                f"the {mixer!r} section ({sorted(mixer_fields)}) nor 'section.field'"
            )
        values.setdefault(section, {})[field] = value
    values.update(vocab_size=vocab_size, d_model=d_model, layer_pattern=mqar_layer_pattern(mixer))
    return ModelConfig.from_dict(values)


def mqar_layer_pattern(mixer: str) -> tuple[str, str]:
    """The layers of ``mixer``'s MQAR model: ``(mixer, mixer)`` for the ``STATE_SPACE_MIXERS``
    (and ``base_conv``), else ``("base_conv", mixer)``."""
    return (mixer, mixer) if mixer in STATE_SPACE_MIXERS else ("base_conv", mixer)


def mixer_of(config: ModelConfig) -> str:
    """The mixer under test: the model's last layer."""
    return config.layer_pattern[-1]


@dataclasses.dataclass(frozen=True)
class StateSize:
    """Floats of recurrent state per sequence, from the mixers' decode caches.

    mixer: the caches of the layers that run the mixer under test (the last layer; both layers
      of a state-space or BaseConv-only model): what docs/mqar.md#state-size counts and the
      figure plots.
    total: every layer's cache, a leading BaseConv's ``(K - 1) * channels`` included.
    """

    mixer: int
    total: int


def state_size(config: ModelConfig, seq_len: int) -> StateSize:
    """State of ``config``'s model at batch 1 after ``seq_len`` tokens, as each layer's mixer
    counts it (``Mixer.state_size``: full attention's KV cache grows with ``seq_len``; every
    other cache does not). Integer bookkeeping such as the KV cache's slot positions is not
    state and is not counted."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    per_layer = [
        layer_mixer(config, name, index, parent=None).state_size(seq_len)
        for index, name in enumerate(config.layer_pattern)
    ]
    under_test = mixer_of(config)
    mixer_state = sum(
        size
        for size, name in zip(per_layer, config.layer_pattern, strict=True)
        if name == under_test
    )
    return StateSize(mixer=mixer_state, total=sum(per_layer))


def answer_logits(
    model: LanguageModel,
    params: Any,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B P"],
) -> Float[Array, "B P V"]:
    """Logits of ``model`` (float32, padded vocabulary) at ``positions`` of each row:
    ``model.apply(params, tokens)[b, positions[b, j]]`` without the rest of the head (the
    ``[B, T, V]`` logits would be mostly thrown away, ``T / P`` times the work)."""
    return model.apply({"params": params}, tokens, positions, method="logits_at")


def init_params(config: ModelConfig, seed: int, seq_len: int = 8) -> Any:
    """Unboxed float32 parameters of ``LanguageModel(config)`` from ``seed``."""
    model = LanguageModel(config)
    # Jitted: one compilation is far cheaper than dispatching every initialiser op by op.
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))
    return nn.meta.unbox(variables["params"])


def zoology_reinit(params: Any, config: ModelConfig, seed: int) -> Any:
    """``params`` re-initialised as Zoology's language model re-initialises Mamba-1 layers.

    Zoology applies one rule to every ``nn.Linear`` of its models after construction: weight
    normal(``init_std``), bias 0, output projections normal(``init_std / sqrt(2 * layers)``).
    jaxbased's Mamba-1 already draws its input, ``x`` and output projections that way, but
    follows mamba_ssm for the time-step projection (weight uniform in ``±dt_rank^-1/2``, bias the
    inverse softplus of a log-uniform time step in ``[dt_min, dt_max]``), which Zoology's rule
    overwrites. Here, in every Mamba-1 mixer (a parameter dict holding ``dt_proj_kernel``),
    ``dt_proj_kernel`` becomes normal(``config.init_std``) and ``dt_bias`` 0, so every time step
    starts near ``softplus(0) = 0.69``. Mamba-2's time-step bias is not a linear layer's bias and
    keeps its init, as in Zoology; every other parameter is returned unchanged. Works on either
    parameter layout (``jaxbased.layer_layout``: a scanned group's leaves have a leading layer
    axis, which the normal draw covers).
    """
    key = jax.random.key(seed)

    def walk(tree: Any) -> Any:
        nonlocal key
        if not isinstance(tree, dict):
            return tree
        tree = {name: walk(value) for name, value in tree.items()}
        if "dt_proj_kernel" in tree and "dt_bias" in tree:
            key, draw = jax.random.split(key)
            kernel = tree["dt_proj_kernel"]
            tree["dt_proj_kernel"] = config.init_std * jax.random.normal(
                draw, kernel.shape, kernel.dtype
            )
            tree["dt_bias"] = jnp.zeros_like(tree["dt_bias"])
        return tree

    return walk(dict(params))
