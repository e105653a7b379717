import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased.ops import (
    FEATURE_MAP_NAMES,
    LinearAttentionState,
    discount_padding,
    expanded_dim,
    init_linear_attention_state,
    linear_attention,
    linear_attention_step,
)
from tests import reference_numpy as ref
from tests.conftest import relative_error

ALGORITHMS = ("quadratic", "chunked", "recurrent")
CHUNK = 8


def make_inputs(rng, feature_map, seq, batch=2, heads=3, feature_dim=4, value_dim=5):
    q = rng.normal(size=(batch, seq, heads, feature_dim))
    k = rng.normal(size=(batch, seq, heads, feature_dim))
    v = rng.normal(size=(batch, seq, heads, value_dim))
    if feature_map in ("identity", "relu"):
        # Keep the kernel positive so that the normalizer is well conditioned.
        q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
    return tuple(a.astype(np.float32) for a in (q, k, v))


@pytest.mark.parametrize("feature_map", FEATURE_MAP_NAMES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("seq", [1, CHUNK, 3 * CHUNK, 3 * CHUNK + 5])
def test_matches_float64_reference(feature_map, algorithm, seq, rng):
    q, k, v = make_inputs(rng, feature_map, seq)
    want, (want_kv, want_z) = ref.linear_attention(q, k, v, feature_map)
    got, state = linear_attention(
        q, k, v, feature_map=feature_map, algorithm=algorithm, chunk_size=CHUNK, return_state=True
    )
    assert got.shape == v.shape and got.dtype == jnp.float32
    assert relative_error(got, want) <= 1e-5
    assert relative_error(state.kv_state, want_kv) <= 1e-5
    assert relative_error(state.k_state, want_z) <= 1e-5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_initial_state_continues_the_sequence(algorithm, rng):
    q, k, v = make_inputs(rng, "taylor", 29)
    split = 11
    _, (kv, z) = ref.linear_attention(q[:, :split], k[:, :split], v[:, :split])
    want, _ = ref.linear_attention(q[:, split:], k[:, split:], v[:, split:], kv_state=kv, k_state=z)
    initial = LinearAttentionState(jnp.asarray(kv, jnp.float32), jnp.asarray(z, jnp.float32))
    got = linear_attention(
        q[:, split:],
        k[:, split:],
        v[:, split:],
        algorithm=algorithm,
        chunk_size=CHUNK,
        initial_state=initial,
    )
    assert relative_error(got, want) <= 1e-5
    # and equals the second half of the whole sequence
    whole = linear_attention(q, k, v, algorithm=algorithm, chunk_size=CHUNK)
    assert relative_error(got, whole[:, split:]) <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_taylor_and_symmetric_taylor_agree(chunk_size, rng):
    q, k, v = make_inputs(rng, "taylor", 37, feature_dim=16, value_dim=8)
    full = linear_attention(q, k, v, feature_map="taylor", chunk_size=chunk_size)
    symmetric = linear_attention(q, k, v, feature_map="taylor_symmetric", chunk_size=chunk_size)
    assert relative_error(symmetric, full) <= 1e-5


@pytest.mark.parametrize("feature_map", ["taylor", "taylor_symmetric", "elu"])
def test_decode_steps_equal_the_parallel_forward(feature_map, rng):
    q, k, v = make_inputs(rng, feature_map, 13)
    batch, seq, heads, feature_dim = q.shape
    state = init_linear_attention_state(
        batch, heads, expanded_dim(feature_map, feature_dim), v.shape[-1]
    )
    outputs = []
    for t in range(seq):
        y, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, feature_map=feature_map)
        outputs.append(y)
    forward, final = linear_attention(q, k, v, feature_map=feature_map, return_state=True)
    assert relative_error(jnp.stack(outputs, 1), forward) <= 1e-5
    assert relative_error(state.kv_state, final.kv_state) <= 1e-5


def test_chunked_gradients_match_quadratic_gradients(rng):
    q, k, v = make_inputs(rng, "taylor", 21)
    weights = rng.normal(size=v.shape).astype(np.float32)

    def loss(algorithm):
        return lambda q, k, v: jnp.sum(
            linear_attention(q, k, v, algorithm=algorithm, chunk_size=CHUNK) * weights
        )

    grads_chunked = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    grads_quadratic = jax.grad(loss("quadratic"), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads_chunked, grads_quadratic, strict=True):
        assert relative_error(got, want) <= 1e-4


def test_bfloat16_inputs_keep_a_float32_state(rng):
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in make_inputs(rng, "taylor", 19))
    y, state = linear_attention(q, k, v, return_state=True)
    assert y.dtype == jnp.bfloat16 and state.kv_state.dtype == jnp.float32
    want, _ = ref.linear_attention(np.float32(q), np.float32(k), np.float32(v))
    assert relative_error(y, want) <= 1e-2


def test_invalid_arguments_are_named(rng):
    q, k, v = make_inputs(rng, "taylor", 4)
    with pytest.raises(ValueError, match="algorithm='fast'"):
        linear_attention(q, k, v, algorithm="fast")
    with pytest.raises(ValueError, match="chunk_size=0"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="feature_map='exp'"):
        linear_attention(q, k, v, feature_map="exp")
    with pytest.raises(ValueError, match="same shape"):
        linear_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention(q, k, v, initial_state=init_linear_attention_state(2, 3, 7, 5))


@pytest.mark.parametrize("feature_map", FEATURE_MAP_NAMES)
@pytest.mark.parametrize("decay", [False, True])
def test_discount_padding_leaves_the_state_of_the_valid_tokens(feature_map, decay, rng):
    seq, lengths = 11, np.array([11, 6, 1])
    q, k, v = make_inputs(rng, feature_map, seq, batch=3)
    valid = np.arange(seq)[None, :] < lengths[:, None]  # [B, T]
    # Right padding as the layers feed it: k = v = 0 and no decay on pad tokens.
    k, v = (np.where(valid[..., None, None], x, 0.0).astype(np.float32) for x in (k, v))
    log_decay = None
    if decay:
        log_decay = -rng.uniform(0.05, 0.5, size=(3, seq, 3))
        log_decay = np.where(valid[..., None], log_decay, 0.0).astype(np.float32)
    _, state = linear_attention(
        q, k, v, feature_map=feature_map, chunk_size=CHUNK, return_state=True, log_decay=log_decay
    )
    got = discount_padding(state, jnp.asarray(seq - lengths, jnp.int32), feature_map)
    assert got.k_state.dtype == state.k_state.dtype and got.kv_state is state.kv_state
    for row, length in enumerate(lengths):
        part = slice(row, row + 1), slice(0, length)
        row_decay = None if log_decay is None else log_decay[part]
        _, (want_kv, want_z) = ref.decayed_linear_attention(
            q[part], k[part], v[part], row_decay, feature_map
        )
        assert relative_error(got.kv_state[row], want_kv[0]) <= 1e-5
        assert relative_error(got.k_state[row], want_z[0]) <= 1e-5


def test_discount_padding_rejects_a_state_no_feature_dim_gives(rng):
    state = init_linear_attention_state(1, 1, 8, 2)  # 1 + F + F**2 is never 8
    with pytest.raises(ValueError, match="no feature_dim gives 8"):
        discount_padding(state, jnp.zeros((1,), jnp.int32), "taylor")
