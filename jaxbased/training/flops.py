"""Analytical FLOPs per token, per mixer, and a measured matmul peak for FLOP utilisation.

Forward FLOPs count 2 per multiply-add of every matmul; training is 3x forward (backward = 2x).
Each mixer counts its own forward FLOPs (``Mixer.flops(seq_len)``, see its module's docstring:
attention over the average number of keys a causal query sees, the chunked scans' intra-chunk
work and state read/update, the state-space models' projections, conv and scan); the blocks'
gated MLPs and the tied head are added here.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxbased.config import ModelConfig
from jaxbased.layers.mlp import GatedMLP
from jaxbased.model import layer_mixer


def mixer_forward_flops(
    name: str, config: ModelConfig, seq_len: int, layer_index: int = 0
) -> float:
    """Forward FLOPs per token of the ``name`` layer ``layer_index`` (projections and
    mixing)."""
    return float(layer_mixer(config, name, layer_index, parent=None).flops(seq_len))


def flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, by part: each mixer kind, ``mlp``, ``head`` and ``total``."""
    parts: dict[str, float] = {}
    for index, name in enumerate(config.layer_pattern):
        flops = mixer_forward_flops(name, config, seq_len, index)
        parts[name] = parts.get(name, 0.0) + 3 * flops
    if config.use_mlp:
        block_mlp = GatedMLP(config.mlp, config.mixer_context, parent=None).flops(seq_len)
        # added to any ``mlp`` mixer layers
        parts["mlp"] = parts.get("mlp", 0.0) + 3 * config.num_layers * block_mlp
    parts["head"] = 3 * 2 * config.d_model * config.padded_vocab_size
    parts["total"] = sum(parts.values())
    return parts


def measure_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 ``size x size`` matmul on the default device (best of ``repeats``)."""
    matmul = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((size, size), jnp.float32)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
