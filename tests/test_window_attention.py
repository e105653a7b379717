import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased.ops import (
    apply_rotary,
    fill_kv_cache,
    init_kv_cache,
    sliding_window_attention,
    sliding_window_attention_step,
)
from tests import reference_numpy as ref
from tests.conftest import relative_error

WINDOW = 4


def qkv(rng, seq, batch=2, heads=3, head_dim=8):
    return tuple(
        rng.normal(size=(batch, seq, heads, head_dim)).astype(np.float32) for _ in range(3)
    )


@pytest.mark.parametrize("block_size", [None, 3])
def test_sliding_window_matches_masked_softmax_for_every_length(block_size, rng):
    for seq in range(1, 3 * WINDOW + 6):
        q, k, v = qkv(rng, seq)
        got = sliding_window_attention(q, k, v, window=WINDOW, block_size=block_size)
        assert relative_error(got, ref.window_attention(q, k, v, WINDOW)) <= 1e-5, seq


@pytest.mark.parametrize("block_size", [None, 5])
def test_full_attention_matches_masked_softmax_for_every_length(block_size, rng):
    # block_size below seq exercises the flash-style online softmax.
    for seq in range(1, 3 * WINDOW + 6):
        q, k, v = qkv(rng, seq)
        got = sliding_window_attention(q, k, v, window=None, block_size=block_size)
        assert relative_error(got, ref.window_attention(q, k, v, None)) <= 1e-5, seq


def test_window_of_one_returns_the_values(rng):
    q, k, v = qkv(rng, 9)
    np.testing.assert_allclose(sliding_window_attention(q, k, v, window=1), v, rtol=1e-6)


def test_long_window_equals_full_attention(rng):
    q, k, v = qkv(rng, 20)
    windowed = sliding_window_attention(q, k, v, window=20)
    full = sliding_window_attention(q, k, v, window=None, block_size=4)
    assert relative_error(windowed, full) <= 1e-5


@pytest.mark.parametrize("window", [1, 3, 129])
def test_gradients_of_blocked_and_direct_forms_agree(window, rng):
    q, k, v = qkv(rng, 23)
    weights = rng.normal(size=v.shape).astype(np.float32)

    def loss(block_size):
        return lambda q, k, v: jnp.sum(
            sliding_window_attention(q, k, v, window=window, block_size=block_size) * weights
        )

    blocked = jax.grad(loss(2), argnums=(0, 1, 2))(q, k, v)
    direct = jax.grad(loss(1024), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(blocked, direct, strict=True):
        assert relative_error(got, want) <= 1e-4


@pytest.mark.parametrize("rotary_dim", [8, 4, 5])
def test_rotary_matches_numpy(rotary_dim, rng):
    x = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
    positions = np.arange(100, 107)
    got = apply_rotary(x, positions, rotary_dim=rotary_dim)
    want = ref.rotary(x, positions, rotary_dim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # relative positions: the score of rotated q, k depends on the offset only
    q, k = x[:, :1], x[:, 1:2]
    near = (apply_rotary(q, [3]) * apply_rotary(k, [1])).sum()
    far = (apply_rotary(q, [53]) * apply_rotary(k, [51])).sum()
    np.testing.assert_allclose(near, far, rtol=1e-4)


def test_rotary_rejects_a_dim_larger_than_the_head(rng):
    with pytest.raises(ValueError, match="rotary_dim=9"):
        apply_rotary(rng.normal(size=(1, 2, 1, 8)), np.arange(2), rotary_dim=9)


@pytest.mark.parametrize("window", [WINDOW, None])
@pytest.mark.parametrize("prompt", [0, 2, 9])
def test_ring_buffer_decode_equals_forward(window, prompt, rng):
    seq = 3 * WINDOW + 3
    q, k, v = qkv(rng, seq)
    forward = sliding_window_attention(q, k, v, window=window)
    capacity = window if window is not None else seq
    if prompt:
        cache = fill_kv_cache(jnp.asarray(k[:, :prompt]), jnp.asarray(v[:, :prompt]), capacity)
    else:
        cache = init_kv_cache(2, capacity, 3, 8)
    for t in range(prompt, seq):
        position = jnp.full((2,), t, jnp.int32)
        y, cache = sliding_window_attention_step(
            q[:, t], k[:, t], v[:, t], cache, position, window=window
        )
        assert relative_error(y, forward[:, t]) <= 1e-5, t
    assert cache.slot_positions.shape[1] == cache.keys.shape[2] == capacity  # [B, H, S, D]


def test_decode_rows_at_different_positions(rng):
    # Row 0 has seen 5 tokens, row 1 has seen 2: each attends only its own keys.
    q, k, v = qkv(rng, 6)
    cache = init_kv_cache(2, WINDOW, 3, 8)
    lengths = [5, 2]
    for t in range(max(lengths)):
        write = np.array([t < lengths[0], t < lengths[1]])
        rows = np.flatnonzero(write)
        sub = cache._replace(
            keys=cache.keys[rows],
            values=cache.values[rows],
            slot_positions=cache.slot_positions[rows],
        )
        _, sub = sliding_window_attention_step(
            q[rows, t], k[rows, t], v[rows, t], sub, jnp.full((len(rows),), t), window=WINDOW
        )
        cache = cache._replace(
            keys=cache.keys.at[rows].set(sub.keys),
            values=cache.values.at[rows].set(sub.values),
            slot_positions=cache.slot_positions.at[rows].set(sub.slot_positions),
        )
    positions = jnp.asarray(lengths, jnp.int32)
    q_new = np.stack([q[0, 5], q[1, 2]])
    k_new = np.stack([k[0, 5], k[1, 2]])
    v_new = np.stack([v[0, 5], v[1, 2]])
    y, _ = sliding_window_attention_step(q_new, k_new, v_new, cache, positions, window=WINDOW)
    want0 = ref.window_attention(q[:1], k[:1], v[:1], WINDOW)[0, 5]
    want1 = ref.window_attention(q[1:, :3], k[1:, :3], v[1:, :3], WINDOW)[0, 2]
    assert relative_error(y[0], want0) <= 1e-5
    assert relative_error(y[1], want1) <= 1e-5


def test_invalid_arguments_are_named(rng):
    q, k, v = qkv(rng, 5)
    with pytest.raises(ValueError, match="window=0"):
        sliding_window_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="block_size=0"):
        sliding_window_attention(q, k, v, window=2, block_size=0)
    with pytest.raises(ValueError, match="capacity 2 is smaller than window=4"):
        sliding_window_attention_step(
            q[:, 0], k[:, 0], v[:, 0], init_kv_cache(2, 2, 3, 8), jnp.zeros(2, jnp.int32), window=4
        )
