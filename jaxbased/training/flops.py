"""Analytical FLOPs per token, per mixer, and a measured matmul peak for FLOP utilisation.

Forward FLOPs count 2 per multiply-add of every matmul; training is 3x forward (backward = 2x).
Attention terms use the average number of keys a causal query sees, ``(T + 1) / 2`` for full
attention and ``min(window, (T + 1) / 2)`` for a window (roughly; exact for T >> window); the
chunked linear attention counts the intra-chunk ``C x C`` work and the state read/update.
The state-space mixers count their projections and conv, plus: Mamba's selective scan one
multiply-add for the state update and one for the read per state entry (``4 * inner * N``);
Mamba-2's SSD and decay attention the chunked scan as BASED (intra-chunk dots and weighted sums,
state read and update per head); an ``mlp`` layer its gated MLP.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxbased.config import ModelConfig
from jaxbased.ops.feature_maps import expanded_dim


def mixer_forward_flops(name: str, config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one mixer layer (projections and mixing)."""
    d = config.d_model
    if name == "base_conv":
        channels = config.conv_channels
        return 2 * d * 2 * channels + 2 * config.conv_kernel_size * channels + 2 * channels * d
    if name == "based":
        heads, features = config.linear_attention_heads, config.feature_dim
        value, expanded = config.linear_attention_value_dim, config.expanded_feature_dim
        chunk = min(config.chunk_size, seq_len)
        projections = 2 * d * heads * (2 * features + value) + 2 * heads * value * d
        per_head = 2 * chunk * features + 2 * chunk * value + 4 * expanded * value
        return projections + heads * per_head
    if name in ("sliding_window", "attention"):
        average_keys = (seq_len + 1) / 2
        if name == "sliding_window":
            average_keys = min(config.window, average_keys)
        return 2 * d * 3 * d + 2 * d * d + 4 * average_keys * d
    if name == "mamba":
        inner, rank = config.ssm_inner_dim, config.mamba_time_step_rank
        state = config.mamba_state_dim
        projections = 2 * d * 2 * inner + 2 * inner * (rank + 2 * state) + 2 * rank * inner
        projections += 2 * inner * d
        return projections + 2 * config.ssm_conv_kernel_size * inner + 4 * inner * state
    if name == "mamba2":
        inner, heads, channels = (
            config.ssm_inner_dim,
            config.mamba2_heads,
            config.mamba2_conv_channels,
        )
        state, head_dim = config.mamba2_state_dim, config.mamba2_head_dim
        chunk = min(config.mamba2_chunk_size, seq_len)
        projections = 2 * d * (inner + channels + heads) + 2 * inner * d
        per_head = 2 * chunk * state + 2 * chunk * head_dim + 4 * state * head_dim
        return projections + 2 * config.ssm_conv_kernel_size * channels + heads * per_head
    if name == "decay_attention":
        heads, key_dim = config.decay_attention_heads, config.decay_head_key_dim
        value = config.decay_value_dim
        expanded = expanded_dim(config.decay_feature_map, key_dim)
        chunk = min(config.chunk_size, seq_len)
        value_projections = 2 if config.decay_output_gate else 1
        projections = 2 * d * heads * (2 * key_dim + value_projections * value)
        projections += 2 * heads * value * d
        per_head = 2 * chunk * expanded + 2 * chunk * value + 4 * expanded * value
        return projections + heads * per_head
    if name == "mlp":
        return 6 * d * config.mlp_hidden_dim
    raise ValueError(f"mixer {name!r} is not known")


def flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, by part: each mixer kind, ``mlp``, ``head`` and ``total``."""
    parts: dict[str, float] = {}
    for name in config.layer_pattern:
        parts[name] = parts.get(name, 0.0) + 3 * mixer_forward_flops(name, config, seq_len)
    if config.use_mlp:
        mlp = 3 * config.num_layers * 6 * config.d_model * config.mlp_hidden_dim
        parts["mlp"] = parts.get("mlp", 0.0) + mlp  # added to any ``mlp`` mixer layers
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
