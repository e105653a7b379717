"""The Pallas linear-attention kernels against the XLA reference.

Kernels run compiled where their accelerator is present (``tests.conftest.kernel_interpret``)
and in Pallas' interpreter elsewhere (the TPU kernels also in the TPU interpreter with race
detection). Lowering is checked from the CPU host with ``jax.export``:
for TPU this runs Pallas -> Mosaic (block-shape rules, supported ops) but not Mosaic's own
layout passes, which only libtpu has; for CUDA it runs Pallas -> Triton IR but not Triton's
PTX compiler. tests/test_pallas_compile.py runs those compilers too (libtpu, the triton
wheel); none of this replaces a run on the hardware (``benchmarks/gpu_check.sh``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels.linear_attention as pallas_linear_attention_module
from jaxbased import ModelConfig
from jaxbased.ops import LinearAttentionState, expanded_dim, linear_attention
from pallas_kernels.linear_attention import linear_attention as pallas_linear_attention
from pallas_kernels.linear_attention._symmetric import (
    antisymmetric_part,
    full_from_symmetric,
    symmetric_from_full,
)
from tests import reference_numpy as ref
from tests.conftest import init_model, kernel_interpret, relative_error, sgd_losses

BACKENDS = ("tpu", "gpu")
CHUNK = 16  # legal on both backends (TPU: multiple of 8; Triton: power of two >= 16)


def make_inputs(rng, *, batch=2, seq=37, heads=3, feature_dim=8, value_dim=5, feature_map="taylor"):
    q = rng.normal(size=(batch, seq, heads, feature_dim)).astype(np.float32)
    k = rng.normal(size=(batch, seq, heads, feature_dim)).astype(np.float32)
    v = rng.normal(size=(batch, seq, heads, value_dim)).astype(np.float32)
    expanded = expanded_dim(feature_map, feature_dim)
    kv_state = (0.1 * rng.normal(size=(batch, heads, expanded, value_dim))).astype(np.float32)
    k_state = np.abs(rng.normal(size=(batch, heads, expanded))).astype(np.float32)
    return q, k, v, (kv_state, k_state)


def reference(q, k, v, initial_state, feature_map, chunk_size=CHUNK):
    state = None if initial_state is None else LinearAttentionState(*initial_state)
    y, final = linear_attention(
        q,
        k,
        v,
        feature_map=feature_map,
        chunk_size=chunk_size,
        initial_state=state,
        return_state=True,
        implementation="xla",
    )
    return y, (final.kv_state, final.k_state)


def kernel(backend, **options):
    def run(q, k, v, initial_state, feature_map, chunk_size=CHUNK):
        return pallas_linear_attention(
            q,
            k,
            v,
            initial_state,
            feature_map=feature_map,
            chunk_size=chunk_size,
            backend=backend,
            interpret=options.get("interpret", kernel_interpret(backend)),
        )

    return run


def loss_and_gradients(attention, q, k, v, initial_state, feature_map, weights):
    # A loss that reads the outputs and the final state, so that every cotangent is non-zero.
    out_weights, kv_weights, k_weights = weights

    def loss(q, k, v, initial_state):
        y, (kv_state, k_state) = attention(q, k, v, initial_state, feature_map)
        return (
            jnp.sum(y.astype(jnp.float32) * out_weights)
            + 0.01 * jnp.sum(kv_state * kv_weights)
            + 0.01 * jnp.sum(k_state * k_weights)
        )

    argnums = (0, 1, 2) if initial_state is None else (0, 1, 2, 3)
    return jax.grad(loss, argnums=argnums)(q, k, v, initial_state)


def random_weights(rng, q, v, feature_map):
    batch, _, heads, feature_dim = q.shape
    expanded = expanded_dim(feature_map, feature_dim)
    return (
        rng.normal(size=v.shape).astype(np.float32),
        rng.normal(size=(batch, heads, expanded, v.shape[-1])).astype(np.float32),
        rng.normal(size=(batch, heads, expanded)).astype(np.float32),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("feature_map", "feature_dim", "seq", "with_state"),
    [("taylor", 8, 37, True), ("taylor_symmetric", 16, 32, False)],
)
def test_float32_forward_state_and_gradients_match_xla(
    backend, feature_map, feature_dim, seq, with_state, rng
):
    q, k, v, state = make_inputs(rng, seq=seq, feature_dim=feature_dim, feature_map=feature_map)
    initial = state if with_state else None
    got, (got_kv, got_k) = kernel(backend)(q, k, v, initial, feature_map)
    want, (want_kv, want_k) = reference(q, k, v, initial, feature_map)
    assert got.shape == v.shape and got.dtype == jnp.float32
    assert relative_error(got, want) <= 1e-5
    assert relative_error(got_kv, want_kv) <= 1e-5
    assert relative_error(got_k, want_k) <= 1e-5
    # and the forward equals the float64 definition
    numpy_y, _ = ref.linear_attention(
        q,
        k,
        v,
        feature_map,
        kv_state=None if initial is None else np.float64(state[0]),
        k_state=None if initial is None else np.float64(state[1]),
    )
    assert relative_error(got, numpy_y) <= 1e-5

    weights = random_weights(rng, q, v, feature_map)
    got_grads = loss_and_gradients(kernel(backend), q, k, v, initial, feature_map, weights)
    want_grads = loss_and_gradients(reference, q, k, v, initial, feature_map, weights)
    for got_grad, want_grad in zip(
        jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True
    ):
        assert relative_error(got_grad, want_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs(backend, rng):
    q, k, v, state = make_inputs(rng, seq=40, feature_dim=16, value_dim=8)
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    got, (got_kv, _) = kernel(backend)(q, k, v, state, "taylor")
    want, (want_kv, _) = reference(q, k, v, state, "taylor")  # float32 math on the same inputs
    assert got.dtype == jnp.bfloat16 and got_kv.dtype == jnp.float32
    assert relative_error(got, want) <= 2e-2
    assert relative_error(got_kv, want_kv) <= 2e-2
    weights = random_weights(rng, q, v, "taylor")
    got_grads = loss_and_gradients(kernel(backend), q, k, v, state, "taylor", weights)
    want_grads = loss_and_gradients(reference, q, k, v, state, "taylor", weights)
    for got_grad, want_grad in zip(
        jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True
    ):
        assert relative_error(got_grad, want_grad) <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_features_and_a_112_value_dim(backend, rng):
    # F = 24 and 32 (601 and 561 features) with the value dim of based-1b's heads.
    for feature_map, feature_dim in (("taylor", 24), ("taylor_symmetric", 32)):
        q, k, v, _ = make_inputs(
            rng, batch=1, seq=20, heads=2, feature_dim=feature_dim, value_dim=112
        )
        q, k = q / 2, k / 2
        got, (got_kv, _) = kernel(backend)(q, k, v, None, feature_map)
        want, (want_kv, _) = reference(q, k, v, None, feature_map)
        assert relative_error(got, want) <= 1e-5, feature_dim
        assert relative_error(got_kv, want_kv) <= 1e-5, feature_dim


def test_tpu_kernels_have_no_races_in_the_tpu_interpreter(rng):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    # Two simulated cores: grid axes marked "parallel" are split between them, so an output
    # block shared across a parallel axis would be reported.
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    q, k, v, state = make_inputs(rng, batch=2, seq=20, heads=1, feature_dim=8, value_dim=4)

    def attention(q, k, v, initial_state, feature_map):
        return pallas_linear_attention(
            q,
            k,
            v,
            initial_state,
            feature_map=feature_map,
            chunk_size=8,
            backend="tpu",
            interpret=params,
        )

    weights = random_weights(rng, q, v, "taylor")
    # One pass runs every kernel: the forward (y is read), dq and dk/dv.
    (got, _), pullback = jax.vjp(lambda *args: attention(*args, "taylor"), q, k, v, state)
    zero_state = (jnp.zeros_like(state[0]), jnp.zeros_like(state[1]))
    got_grads = pullback((jnp.asarray(weights[0]), zero_state))
    jax.block_until_ready(got_grads)
    assert not interpret_pallas_call.races.races_found
    (want, _), want_pullback = jax.vjp(
        lambda *args: reference(*args, "taylor", chunk_size=8), q, k, v, state
    )
    want_grads = want_pullback((jnp.asarray(weights[0]), zero_state))
    assert relative_error(got, want) <= 1e-5
    for got_grad, want_grad in zip(
        jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True
    ):
        assert relative_error(got_grad, want_grad) <= 1e-5


PLATFORMS = {"tpu": "tpu", "gpu": "cuda"}


def export_for(backend, function, *shapes):
    checks = []
    if backend == "gpu":
        # Pallas' Triton kernels are a custom call that jax.export does not vouch for.
        checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return jax.export.export(
        jax.jit(function), platforms=[PLATFORMS[backend]], disabled_checks=checks
    )(*shapes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("feature_map", "feature_dim", "value_dim", "dtype", "chunk"),
    [
        ("taylor", 16, 64, jnp.bfloat16, 64),  # based-360m
        ("taylor", 16, 112, jnp.bfloat16, 64),  # based-1b
        ("taylor_symmetric", 24, 64, jnp.float32, 32),
    ],
)
def test_kernels_lower_for_the_hardware(backend, feature_map, feature_dim, value_dim, dtype, chunk):
    chunk = chunk if backend == "tpu" else 16
    q = jax.ShapeDtypeStruct((2, 300, 4, feature_dim), dtype)
    v = jax.ShapeDtypeStruct((2, 300, 4, value_dim), dtype)

    def forward_and_backward(q, k, v):
        def loss(q, k, v):
            y, (kv_state, _) = pallas_linear_attention(
                q, k, v, feature_map=feature_map, chunk_size=chunk, backend=backend
            )
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(kv_state)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    exported = export_for(backend, forward_and_backward, q, q, v)
    text = exported.mlir_module()
    marker = "tpu_custom_call" if backend == "tpu" else "__gpu$xla.gpu.triton"
    assert text.count(marker) >= 3  # forward, dq, dk/dv kernels


@pytest.mark.parametrize("feature_dim", [3, 16])
def test_symmetric_state_layout_converts_exactly(feature_dim, rng):
    # The kernels run the symmetric expansion; taylor states cross the boundary through these
    # maps. Checked against the float64 feature maps of docs/mixers/based.md
    # (tests/reference_numpy.py).
    x = rng.normal(size=(4, feature_dim))
    full, symmetric = ref.phi(x, "taylor"), ref.phi(x, "taylor_symmetric")
    # out of the kernel: the symmetric state of phi(k) v^T is the full one, re-laid out
    np.testing.assert_allclose(full_from_symmetric(symmetric, feature_dim, axis=1), full, rtol=1e-6)
    np.testing.assert_allclose(symmetric_from_full(full, feature_dim, axis=1), symmetric, rtol=1e-6)
    # into it: any full state (asymmetric too) is read identically by every query
    state = rng.normal(size=(full.shape[1], 5))
    converted = np.asarray(symmetric_from_full(state, feature_dim, axis=0), np.float64)
    np.testing.assert_allclose(symmetric @ converted, full @ state, rtol=1e-5, atol=1e-5)
    # what no query reads is the antisymmetric part: the round trip restores the rest
    round_trip = full_from_symmetric(converted, feature_dim, axis=0)
    restored = round_trip + antisymmetric_part(state, feature_dim, axis=0)
    np.testing.assert_allclose(restored, state, rtol=1e-5, atol=1e-6)
    assert np.abs(full @ np.asarray(antisymmetric_part(state, feature_dim, axis=0))).max() < 1e-5
    message = f"full state has {symmetric.shape[1]} features on axis 1; expected {full.shape[1]}"
    with pytest.raises(ValueError, match=message):
        symmetric_from_full(symmetric, feature_dim, axis=1)


def test_illegal_block_sizes_name_the_dimension(rng):
    q, k, v, _ = make_inputs(rng, seq=8)
    with pytest.raises(ValueError, match="chunk_size=12 must be a multiple of 8"):
        pallas_linear_attention(q, k, v, chunk_size=12, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="chunk_size=24 must be a power of two >= 16"):
        pallas_linear_attention(q, k, v, chunk_size=24, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="chunk_size=128 is over the GPU kernel's 64"):
        pallas_linear_attention(q, k, v, chunk_size=128, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="value_block_size=48"):
        pallas_linear_attention(q, k, v, value_block_size=48, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="feature_map='cosformer' has no kernel; allowed: taylor"):
        pallas_linear_attention(q, k, v, feature_map="cosformer", backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="initial_state"):
        bad_state = (np.zeros((2, 3, 7, 5), np.float32), np.zeros((2, 3, 7), np.float32))
        pallas_linear_attention(q, k, v, bad_state, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="backend='cpu'"):
        pallas_linear_attention(q, k, v, backend="cpu", interpret=True)


def test_ops_dispatch(rng, monkeypatch):
    q, k, v, state = make_inputs(rng, seq=21)
    forced = linear_attention(q, k, v, chunk_size=8, implementation="pallas")
    assert relative_error(forced, linear_attention(q, k, v, chunk_size=8)) <= 1e-5
    # prefill continuing from a state, returning the state
    initial = LinearAttentionState(*(jnp.asarray(x) for x in state))
    results = [
        linear_attention(
            q, k, v, chunk_size=8, initial_state=initial, return_state=True, implementation=name
        )
        for name in ("pallas", "xla")
    ]
    (got, got_state), (want, want_state) = results
    assert isinstance(got_state, LinearAttentionState)
    assert relative_error(got, want) <= 1e-5
    assert relative_error(got_state.kv_state, want_state.kv_state) <= 1e-5
    with pytest.raises(ValueError, match=r"implementation='pallas' cannot run.*'quadratic'"):
        linear_attention(q, k, v, algorithm="quadratic", implementation="pallas")
    with pytest.raises(ValueError, match="implementation='fast' is not known"):
        linear_attention(q, k, v, implementation="fast")

    # "auto" on CPU is the XLA reference: the kernel is never called.
    def fail(*args, **kwargs):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(pallas_linear_attention_module, "linear_attention", fail)
    linear_attention(q, k, v, implementation="auto")


def test_model_config_validates_implementation():
    with pytest.raises(ValueError, match="implementation='cuda' is not known"):
        ModelConfig.from_preset("based_tiny", implementation="cuda")


def test_based_model_trains_the_same_with_the_kernels(rng):
    seq = 48  # 3 linear-attention chunks of 16
    tokens = jnp.asarray(rng.integers(0, 256, size=(2, seq + 1)), jnp.int32)

    def train(implementation: str, steps: int = 2) -> list[float]:
        config = ModelConfig.from_preset("based_tiny", implementation=implementation)
        model, params = init_model(config, seq=seq)
        return sgd_losses(model, params, tokens, learning_rate=0.5, steps=steps)

    xla_losses, pallas_losses = train("xla"), train("pallas")
    assert xla_losses[-1] < xla_losses[0]  # it does train
    np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-5)


MESH_SCRIPT = r"""
import json
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxbased.ops import linear_attention, sliding_window_attention

mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
)
rng = np.random.default_rng(0)
q, k = (rng.normal(size=(4, 24, 2, 8)).astype(np.float32) for _ in range(2))
v = rng.normal(size=(4, 24, 2, 5)).astype(np.float32)
log_decay = np.log(rng.uniform(0.5, 1.0, size=(4, 24, 2))).astype(np.float32)
per_head_log_decay = np.log(np.array([0.9, 0.7], np.float32))


def both(q, k, v, log_decay, implementation):
    y, state = linear_attention(
        q, k, v, chunk_size=8, return_state=True, implementation=implementation
    )
    o = sliding_window_attention(q, k, q, window=5, implementation=implementation)
    continued = linear_attention(
        q, k, v, chunk_size=8, initial_state=state, implementation=implementation
    )
    decayed = linear_attention(
        q, k, v, chunk_size=8, log_decay=log_decay, initial_state=state,
        implementation=implementation,
    )
    unnormalized = linear_attention(
        q, k, v, chunk_size=8, log_decay=per_head_log_decay, normalize=False,
        implementation=implementation,
    )
    return y, state.kv_state, o, continued, decayed, unnormalized


def loss(q, k, v, log_decay, implementation):
    return sum(x.sum() for x in both(q, k, v, log_decay, implementation))


def relative(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


with jax.set_mesh(mesh):
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    # log_decay [B, T, H] is split like the tokens
    decay_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))
    args = [jax.device_put(x, sharding) for x in (q, k, v)]
    args.append(jax.device_put(log_decay, decay_sharding))
    forward = jax.jit(lambda *args: both(*args, "pallas"))
    hlo = forward.lower(*args).compile().as_text()
    got, want = forward(*args), jax.jit(lambda *args: both(*args, "xla"))(*args)
    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    got_grads = jax.jit(lambda *args: grad(*args, "pallas"))(*args)
    want_grads = jax.jit(lambda *args: grad(*args, "xla"))(*args)
    print(json.dumps({
        "collectives": [op for op in ("all-gather", "all-reduce", "all-to-all") if op in hlo],
        "output_spec": str(got[0].sharding.spec),
        "errors": [relative(a, b) for a, b in zip(got + got_grads, want + want_grads)],
    }))
"""


def test_kernels_run_per_shard_under_a_mesh():
    # 8 simulated CPU devices in a subprocess (the device count is fixed at JAX start-up).
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # On CPU even where a GPU/TPU is present (the simulated devices are CPU ones).
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["collectives"] == []  # each device ran the kernels on its own shard
    assert report["output_spec"] == "P(('data', 'fsdp'), None, 'tensor', None)"
    assert max(report["errors"]) <= 1e-5
