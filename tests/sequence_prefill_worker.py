"""Runs in a subprocess with 8 simulated CPU devices (set before JAX starts); used by
tests/test_sequence_parallel_prefill.py. Compares prefills over time-split meshes with one
device (logits and every cache leaf), decodes greedily from the sharded caches, runs
``generate`` under a mesh, and compares the Pallas kernels per shard (interpreted) with the
sharded XLA ops and the unsharded ones. Prints one JSON line with what it measured."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import sys

if __name__ == "__main__":  # before JAX starts; importing this module changes nothing
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jaxbased import LanguageModel, ModelConfig

#: Prompts of T = 72 tokens: 4.5 chunks of 16, 9-token slices on 8 shards (the window's 7
#: earlier keys and the convs' 2 and 3 inputs fit). Ragged rows end inside a slice, on a
#: slice boundary, in the first slice and at the end; the window of the 50-token row spans two
#: slices of 9, 18 and 36 tokens.
SEQ_LEN = 72
LENGTHS = (50, 72, 9, 1)
MAX_LEN = 80
DECODE_STEPS = 3
#: A BASED model (short conv, linear attention, sliding window, with MLPs).
BASED_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=3,
    layer_pattern=("base_conv", "based", "sliding_window"),
    based=dict(heads=4, feature_dim=4, chunk_size=16),
    sliding_window=dict(heads=4, window=8),
    mlp=dict(inner_dim=64),
)
#: A Mamba-2 hybrid in NVIDIA's style (single-sublayer blocks, the MLP a mixer) with the
#: decayed linear attentions (RetNet decay, TransNormerLLM with LRPE in its first layer) and a
#: window.
HYBRID_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=5,
    use_mlp=False,
    layer_pattern=("transnormer", "mamba2", "mlp", "decay_attention", "sliding_window"),
    mamba2=dict(state_dim=8, head_dim=16, chunk_size=16),
    decay_attention=dict(heads=4, chunk_size=16),
    transnormer=dict(heads=4, chunk_size=16),
    sliding_window=dict(heads=4, window=8),
    mlp=dict(inner_dim=64),
)
#: Transformer++ attention (rotary on half of each head) and CCA-Attention (groups of 3, a local
#: window of 6: whole groups and the 7-key raw halo fit in 9-token slices).
ATTENTION_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    layer_pattern=("attention", "cca_attention"),
    attention=dict(heads=4, rotary_fraction=0.5),
    cca_attention=dict(heads=4, group_size=3, local_window=6),
    mlp=dict(inner_dim=64),
)
#: Mamba-1 and SeqBoat (half of 72 packed slots, a window of 8 packed keys).
SCAN_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    layer_pattern=("mamba", "seqboat"),
    use_mlp=False,
    mamba=dict(state_dim=8, chunk_size=16),
    seqboat=dict(
        ema_dim=4,
        attention_dim=16,
        window=8,
        capacity_fraction=0.5,
        capacity_bucket=1,
        ema_chunk_size=16,
    ),
)
#: (model, mesh (data, fsdp, tensor, sequence), ragged): sequence 2, 4 and 8, alone and with
#: the batch and head axes; one compile each.
PREFILL_CASES = [
    ("based", (1, 1, 1, 8), True),
    ("based", (1, 1, 1, 8), False),
    ("based", (1, 2, 2, 2), True),
    ("hybrid", (2, 1, 1, 4), True),
    ("hybrid", (2, 1, 2, 2), True),
    ("attention", (1, 1, 1, 8), True),
    ("attention", (2, 1, 1, 4), True),
    ("scan", (1, 1, 1, 8), True),
    ("scan", (1, 2, 2, 2), True),
    # implementation="pallas": the kernels per shard (interpreted), against the XLA one device.
    ("based_pallas", (1, 1, 1, 4), True),
]
#: The prefills whose compiled collectives are counted: BASED, and Mamba-1 + SeqBoat (whose
#: SeqBoat layer, ``layers_1``, must gather no activations).
HLO_CASE = ("based", (1, 1, 1, 8), True)
SCAN_HLO_CASE = ("scan", (1, 1, 1, 8), True)
#: The per-shard kernel checks: (op, mesh), sequence alone and with data.
KERNEL_CASES = [
    ("linear_attention", (1, 1, 1, 4)),
    ("decayed_state", (2, 1, 1, 2)),
    ("window", (1, 1, 1, 4)),
]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def leaf_errors(actual, expected) -> dict[str, float]:
    """``{path: relative error}`` for every leaf (each against its own largest entry)."""
    flat_actual = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_expected = jax.tree.leaves(expected)
    return {
        jax.tree_util.keystr(path): relative_error(a, b)
        for (path, a), b in zip(flat_actual, flat_expected, strict=True)
    }


def mesh_name(shape) -> str:
    return "x".join(map(str, shape))


def gathers_by_layer(hlo: str) -> dict[str, int]:
    """``{layer: all-gathers}`` of compiled HLO text, by the layer named in their metadata
    (``layers_<i>``; an async start/done pair counts once)."""
    counts: dict[str, int] = {}
    for line in hlo.splitlines():
        if not re.search(r" all-gather(?:-start)?\(", line):
            continue
        layer = re.search(r"/(layers_\d+)[./]", line)
        if layer:
            counts[layer.group(1)] = counts.get(layer.group(1), 0) + 1
    return counts


def model_and_params(fields: dict):
    from flax import linen as nn

    model = LanguageModel(ModelConfig.from_dict(fields))
    boxed = model.init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]
    return model, boxed, nn.meta.unbox(boxed)


def decode_function(model):
    """One compiled decode step of ``model``: ``(params, tokens [B], cache) -> (logits,
    cache)``."""
    return jax.jit(
        lambda params, tokens, cache: model.apply(
            {"params": params}, tokens, cache, method="decode_step"
        )
    )


def greedy_decode(model, step, params, logits, cache, lengths) -> np.ndarray:
    """``DECODE_STEPS`` greedy tokens per row on one device (``step`` from
    :func:`decode_function`), from the prefill's last valid logits and its cache."""
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    token = jnp.argmax(last[:, : model.config.vocab_size], axis=-1)
    tokens = [token]
    for _ in range(DECODE_STEPS - 1):
        step_logits, cache = step(params, token, cache)
        token = jnp.argmax(step_logits[:, : model.config.vocab_size], axis=-1)
        tokens.append(token)
    return np.stack([np.asarray(t) for t in tokens], axis=1)


def prefill_cases() -> dict:
    """Logits, every cache leaf and greedy continuations of sharded prefills vs one device."""
    from flax import linen as nn

    from jaxbased.sharding import LOGICAL_RULES, batch_sharding, logical_shardings, make_mesh
    from tests.sequence_worker import collective_counts

    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 64, size=(4, SEQ_LEN)), jnp.int32)
    ragged = jnp.asarray(LENGTHS, jnp.int32)
    full = jnp.full((4,), SEQ_LEN, jnp.int32)
    report: dict = {}
    models = (
        ("based", BASED_MODEL),
        ("hybrid", HYBRID_MODEL),
        ("attention", ATTENTION_MODEL),
        ("scan", SCAN_MODEL),
    )
    for name, fields in models:
        if not any(case[0] in (name, f"{name}_pallas") for case in PREFILL_CASES):
            continue
        model, boxed, params = model_and_params(fields)

        def prefill(params, tokens, lengths, model=model):
            return model.apply(
                {"params": params}, tokens, MAX_LEN, lengths, method="prefill"
            )  # fmt: skip

        with_lengths = jax.jit(prefill)
        without_lengths = jax.jit(
            lambda params, tokens, prefill=prefill: prefill(params, tokens, None)
        )
        expected = {True: with_lengths(params, tokens, ragged)}
        if any(case[0] == name and not case[2] for case in PREFILL_CASES):
            expected[False] = without_lengths(params, tokens)
        step = decode_function(model)
        expected_tokens = {
            key: greedy_decode(model, step, params, *value, ragged if key else full)
            for key, value in expected.items()
        }
        for case_model, shape, is_ragged in PREFILL_CASES:
            if case_model not in (name, f"{name}_pallas"):
                continue
            run_ragged, run_full = with_lengths, without_lengths
            if case_model != name:  # the same parameters, the kernels per shard
                kernels = LanguageModel(model.config.replace(implementation="pallas"))
                run_ragged = jax.jit(functools.partial(prefill, model=kernels))
            mesh = make_mesh(shape)
            shardings = logical_shardings(jax.eval_shape(lambda boxed=boxed: boxed), mesh)
            with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
                placed = jax.device_put(params, shardings)
                placed_tokens = jax.device_put(tokens, batch_sharding(mesh))
                if is_ragged:
                    logits, cache = run_ragged(placed, placed_tokens, ragged)
                else:
                    logits, cache = run_full(placed, placed_tokens)
                collectives = None
                if (case_model, shape, is_ragged) in (HLO_CASE, SCAN_HLO_CASE):
                    text = with_lengths.lower(placed, placed_tokens, ragged).compile().as_text()
                    collectives = collective_counts(text)
                    collectives["gathers_by_layer"] = gathers_by_layer(text)
            expected_logits, expected_cache = expected[is_ragged]
            cache = jax.device_get(cache)  # decoding continues on one device
            lengths = ragged if is_ragged else full
            report[f"{case_model}/{mesh_name(shape)}/{'ragged' if is_ragged else 'full'}"] = {
                "collectives": collectives,
                "logits": relative_error(logits, expected_logits),
                "cache": leaf_errors(cache, expected_cache),
                "tokens_equal": bool(
                    np.array_equal(
                        greedy_decode(model, step, params, jnp.asarray(logits), cache, lengths),
                        expected_tokens[is_ragged],
                    )
                ),
            }
    return report


def generate_case() -> dict:
    """``jaxbased.generate`` under a data x sequence mesh gives the one-device tokens."""
    from flax import linen as nn

    from jaxbased.generation import generate
    from jaxbased.sharding import LOGICAL_RULES, make_mesh

    model, _, params = model_and_params(BASED_MODEL)
    prompts = [list(range(1, 20)), [5, 6, 7], list(range(30, 60)), [9]]
    expected = generate(model, params, prompts, max_new_tokens=4, temperature=0)
    with jax.set_mesh(make_mesh((2, 1, 1, 4))), nn.logical_axis_rules(LOGICAL_RULES):
        actual = generate(model, params, prompts, max_new_tokens=4, temperature=0)
    return {"tokens_equal": actual.tokens == expected.tokens, "tokens": actual.tokens}


def kernel_cases() -> dict:
    """Values and gradients of the Pallas kernels per shard (interpreted) vs the sharded XLA ops
    vs no mesh: linear attention (Taylor, normalized) and decayed (identity map, per-step decay,
    unnormalised), each with its returned state, and the window."""
    from jaxbased.ops import linear_attention, sliding_window_attention
    from jaxbased.sharding import make_mesh

    rng = np.random.default_rng(0)
    batch, seq, heads = 2, 64, 2

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

    q, k = normal(batch, seq, heads, 4, scale=0.5), normal(batch, seq, heads, 4, scale=0.5)
    v = normal(batch, seq, heads, 8)
    log_decay = jnp.asarray(np.log(rng.uniform(0.7, 1.0, (batch, seq, heads))), jnp.float32)

    def based(implementation):
        def op(q, k, v, log_decay):
            return linear_attention(
                q, k, v, chunk_size=16, return_state=True, implementation=implementation
            )

        return op

    def decayed(implementation):
        def op(q, k, v, log_decay):
            y, state = linear_attention(
                q, k, v, feature_map="identity", chunk_size=16, log_decay=log_decay,
                normalize=False, return_state=True, implementation=implementation,
            )  # fmt: skip
            return y, state

        return op

    def window(implementation):
        def op(q, k, v, log_decay):
            return sliding_window_attention(
                q, k, v, window=9, block_size=8, implementation=implementation
            )

        return op

    report: dict = {}
    makers = {"linear_attention": based, "decayed_state": decayed, "window": window}
    for name, shape in KERNEL_CASES:
        make = makers[name]

        def loss(q, k, v, log_decay, op):
            out = op(q, k, v, log_decay)
            return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(out))

        def run(implementation, make=make):
            op = make(implementation)
            value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
            return jax.jit(lambda *args: (op(*args), value_and_grad(*args, op)))(q, k, v, log_decay)

        expected = run("xla")
        with jax.set_mesh(make_mesh(shape)):
            kernel, xla = run("pallas"), run("xla")
        report[name] = {
            "mesh": mesh_name(shape),
            "kernel_vs_xla": max(leaf_errors(kernel, xla).values()),
            "kernel_vs_one_device": max(leaf_errors(kernel, expected).values()),
        }
    return report


def refusals() -> dict:
    """The messages of the ops and mixers that cannot run ``pallas`` per shard."""
    from jaxbased.ops.sequence_parallel import check_sequence_implementation
    from jaxbased.sharding import make_mesh

    messages = {}
    with jax.set_mesh(make_mesh((1, 1, 1, 8))):
        try:
            check_sequence_implementation("short_conv", "pallas")
            messages["op"] = None
        except ValueError as error:
            messages["op"] = str(error)
    return messages


if __name__ == "__main__":
    import time

    result, seconds = {}, {}
    for name, case in [
        ("prefill", prefill_cases),
        ("generate", generate_case),
        ("kernels", kernel_cases),
        ("refusals", refusals),
    ]:
        start = time.perf_counter()
        result[name] = case()
        seconds[name] = round(time.perf_counter() - start, 1)
    result["seconds"] = seconds
    print("RESULT " + json.dumps(result), flush=True)
