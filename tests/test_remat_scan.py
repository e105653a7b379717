"""Remat and scanned layers: the same function (loss, gradients, generated tokens) as the plain
unrolled model, and checkpoints that move between the unrolled and stacked layouts."""

from __future__ import annotations

import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbased import LanguageModel, ModelConfig, layer_layout
from jaxbased.config import hybrid_layer_pattern
from jaxbased.layer_layout import (
    SCANNED_LAYERS,
    convert_layout,
    find_repeating_unit,
    is_stacked,
    to_unrolled,
)
from jaxbased.presets import PRESETS
from jaxbased.sharding import LOGICAL_RULES
from jaxbased.training.checkpointing import check_compatible
from jaxbased.training.optimizer import make_optimizer
from jaxbased.training.state import TrainState

_TINY_BASED = dict(
    vocab_size=64,
    d_model=32,
    mlp={"inner_dim": 64, "multiple_of": 32},
    based={"heads": 2, "feature_dim": 4, "chunk_size": 8},
    sliding_window={"heads": 2, "window": 8},
)

#: Four model kinds, each with a pattern that repeats (and a remainder where it can have one).
MODELS = {
    "based": ModelConfig(
        num_layers=5,
        layer_pattern=("base_conv", "based", "base_conv", "based", "sliding_window"),
        **_TINY_BASED,
    ),
    "transformer": ModelConfig(
        vocab_size=64,
        d_model=32,
        num_layers=3,
        layer_pattern=("attention",) * 3,
        mlp={"inner_dim": None, "multiple_of": 32},
        attention={"heads": 2, "rotary_fraction": 0.5},
    ),
    "mamba2": ModelConfig(
        vocab_size=64,
        d_model=32,
        num_layers=3,
        layer_pattern=("mamba2",) * 3,
        use_mlp=False,
        mamba2={"state_dim": 8, "head_dim": 16, "chunk_size": 8},
    ),
    "hybrid": ModelConfig(
        vocab_size=64,
        d_model=32,
        num_layers=6,
        layer_pattern=hybrid_layer_pattern("M*-M*-"),
        use_mlp=False,
        mlp={"inner_dim": 64, "multiple_of": 32},
        attention={"heads": 2, "rotary_fraction": 0.0},
        mamba2={"state_dim": 8, "head_dim": 16, "chunk_size": 8},
    ),
}
#: A first layer unlike the rest: an unrolled head, then the repeats (layers 1-3).
HEADED = ModelConfig(
    num_layers=4, layer_pattern=("sliding_window", "based", "based", "based"), **_TINY_BASED
)
ALL_MODELS = {**MODELS, "headed": HEADED}
BATCH, SEQ = 2, 16


def _tokens(seed: int = 0, shape: tuple[int, int] = (BATCH, SEQ + 1)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, size=shape), jnp.int32)


def _loss_and_grads(config: ModelConfig, params, tokens):
    model = LanguageModel(config)

    def loss(params):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


@functools.cache
def _init(kind: str):
    """Unrolled float32 parameters of ``MODELS[kind]``."""
    init = jax.jit(LanguageModel(ALL_MODELS[kind]).init)
    return nn.meta.unbox(init(jax.random.key(0), _tokens()[:, :4])["params"])


@functools.cache
def _reference(kind: str):
    """Unrolled parameters, loss and gradients of the model without remat (float32)."""
    config = MODELS[kind]
    params = _init(kind)
    loss, grads = _loss_and_grads(config, params, _tokens())
    return params, float(loss), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize(
    "kind,remat,scan_layers",
    [(kind, "minimal", False) for kind in MODELS]
    + [(kind, "full", False) for kind in MODELS]
    + [(kind, "none", True) for kind in MODELS],
)
def test_remat_and_scan_keep_loss_and_gradients(kind, remat, scan_layers):
    params, loss, grads = _reference(kind)
    config = MODELS[kind].replace(remat=remat, scan_layers=scan_layers)
    assert is_stacked(config) == scan_layers  # every kind's pattern repeats
    own_params = convert_layout(params, config)
    if scan_layers:
        assert SCANNED_LAYERS in own_params and "layers_0" not in own_params
        # The layout the model builds itself is the one the conversion gives.
        built = LanguageModel(config).init(jax.random.key(0), _tokens()[:, :4])["params"]
        assert jax.tree.structure(nn.meta.unbox(built)) == jax.tree.structure(own_params)
        assert jax.tree.map(np.shape, nn.meta.unbox(built)) == jax.tree.map(np.shape, own_params)
    own_loss, own_grads = _loss_and_grads(config, own_params, _tokens())
    own_grads = to_unrolled(own_grads, config)
    assert jax.tree.structure(own_grads) == jax.tree.structure(grads)
    # Remat replays the same operations; a scan fuses a little differently: float32 rounding.
    np.testing.assert_allclose(float(own_loss), loss, rtol=1e-6)
    for own, expected in zip(jax.tree.leaves(own_grads), jax.tree.leaves(grads), strict=True):
        scale = max(float(np.abs(expected).max()), 1e-3)
        np.testing.assert_allclose(np.asarray(own), expected, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("kind", ["based", "hybrid", "headed"])
def test_scanned_generation_gives_the_unrolled_tokens(kind):
    params = _init(kind)
    config = ALL_MODELS[kind]
    scanned_config = config.replace(scan_layers=True)
    prompt = _tokens(1, (BATCH, 9))
    lengths = jnp.asarray([9, 6], jnp.int32)

    def greedy(config, params, steps=6):
        model = LanguageModel(config)
        logits, cache = model.apply(
            {"params": params}, prompt, 20, lengths, True, method=LanguageModel.prefill
        )
        assert jax.tree.structure(cache) == jax.tree.structure(model.init_cache(BATCH, 20))
        decode = jax.jit(
            lambda tokens, cache: model.apply(
                {"params": params}, tokens, cache, method=LanguageModel.decode_step
            )
        )
        tokens, all_logits = [], [logits]
        for _ in range(steps):
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            tokens.append(np.asarray(token))
            logits, cache = decode(token, cache)
            all_logits.append(logits)
        return np.stack(tokens), np.stack(all_logits)

    tokens, logits = greedy(config, params)
    scanned_tokens, scanned_logits = greedy(scanned_config, convert_layout(params, scanned_config))
    np.testing.assert_array_equal(scanned_tokens, tokens)
    np.testing.assert_allclose(scanned_logits, logits, rtol=0, atol=1e-5)


def test_repeating_units_of_the_released_patterns():
    # (unit length, repeats, remainder length) worked out by hand from docs/model.md's patterns.
    expected = {
        "based_360m": (5, 5, 2),  # layers 0-24 repeat [conv, based, window, conv, conv]
        "based_1b": (5, 5, 11),  # the 1b pattern shifts at layer 27
        "attn_360m": (1, 24, 0),
        "mamba2_360m": (1, 48, 0),
        "mamba2_hybrid_360m": (12, 4, 0),  # "M-M-M*-M-M--" * 4, not "M-" * 2 + 44 layers
    }
    for name, (period, repeats, remainder) in expected.items():
        pattern = PRESETS[name]().layer_pattern
        plan = find_repeating_unit(pattern)
        assert (len(plan.unit), plan.repeats, len(plan.remainder)) == (period, repeats, remainder)
        assert plan.unit * plan.repeats + plan.remainder == pattern
    assert find_repeating_unit(("based", "attention", "mlp")) is None
    assert find_repeating_unit(("mlp", "mlp")).repeats == 2


def test_a_pattern_that_repeats_after_its_first_layers_gets_an_unrolled_head():
    plan = find_repeating_unit(("attention", "based", "mlp", "based", "mlp", "based"))
    assert (plan.start, plan.unit, plan.repeats, plan.remainder) == (
        1,
        ("based", "mlp"),
        2,
        ("based",),
    )
    assert list(plan.scanned_range) == [1, 2, 3, 4] and plan.unit_layer(1, 0) == 3
    # A pattern that repeats from its first layer keeps the plan it had (no head) ...
    assert find_repeating_unit(("mlp", "mlp", "based", "based", "based")).start == 0
    # ... and variants split layers of one name: the first one differs, so it is the head.
    plan = find_repeating_unit(("based",) * 4, variants=(True, False, False, False))
    assert (plan.start, plan.repeats) == (1, 3)
    config = HEADED.replace(scan_layers=True)
    params = convert_layout(_init("headed"), config)
    assert sorted(params) == ["embedding", "final_norm", "layers_0", SCANNED_LAYERS]
    np.testing.assert_array_equal(
        params[SCANNED_LAYERS]["block_0"]["norm1"]["weight"][2],
        _init("headed")["layers_3"]["norm1"]["weight"],
    )
    tokens = _tokens()
    want = jax.jit(LanguageModel(HEADED).apply)({"params": _init("headed")}, tokens)
    got = jax.jit(LanguageModel(config).apply)({"params": params}, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_pattern_without_repeat_runs_unrolled_with_one_log_line():
    pattern = ("mamba2", "attention", "mlp", "attention")
    config = MODELS["hybrid"].replace(num_layers=4, layer_pattern=pattern, scan_layers=True)
    model = LanguageModel(config)
    # Logged once per pattern and process: forget an earlier test's log of the same pattern.
    # The call itself is watched, not a log handler: absl's level and handlers depend on which
    # command an earlier test in this process ran.
    layer_layout._log_unrolled_fallback.cache_clear()
    with mock.patch.object(layer_layout.logging, "info") as log_info:
        for _ in range(2):
            variables = jax.eval_shape(lambda: model.init(jax.random.key(0), _tokens()[:, :4]))
    assert sorted(variables["params"]) == sorted(
        ["embedding", "final_norm", "layers_0", "layers_1", "layers_2", "layers_3"]
    )
    lines = [call.args[0] % call.args[1:] for call in log_info.call_args_list]
    lines = [line for line in lines if "no repeating unit" in line]
    assert len(lines) == 1 and "4 layers run unrolled" in lines[0]


def test_layout_conversion_of_a_train_state_is_exact_both_ways():
    config = MODELS["based"].replace(scan_layers=True)
    model, optimizer = LanguageModel(MODELS["based"]), make_optimizer(optax.constant_schedule(1.0))

    def init_state():
        params = nn.meta.unbox(model.init(jax.random.key(0), _tokens()[:, :4])["params"])
        return TrainState.create(params, optimizer)

    # Every leaf (parameters, AdamW's count, mu and nu) distinct random values: nothing compiles.
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype),
        jax.eval_shape(init_state),
    )
    stacked = convert_layout(state, config)
    mu = stacked.opt_state[1][0].mu
    assert mu[SCANNED_LAYERS]["block_1"]["norm1"]["weight"].shape == (2, 32)  # 2 repeats
    assert "layers_4" in mu and "layers_0" not in mu  # the remainder keeps its name
    # Row r of block j is layer r * 2 + j of the unrolled tree.
    np.testing.assert_array_equal(
        stacked.params[SCANNED_LAYERS]["block_0"]["norm1"]["weight"][1],
        state.params["layers_2"]["norm1"]["weight"],
    )
    back = to_unrolled(stacked, config)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Abstract trees (restore targets) convert the same way.
    abstract = jax.eval_shape(lambda: state)
    assert jax.tree.map(np.shape, convert_layout(abstract, config)) == jax.tree.map(
        np.shape, stacked
    )


def test_stacked_parameters_carry_a_replicated_layers_axis():
    config = MODELS["transformer"].replace(scan_layers=True)
    boxed = jax.eval_shape(
        lambda: LanguageModel(config).init(jax.random.key(0), _tokens()[:, :4])["params"]
    )
    kernel = boxed[SCANNED_LAYERS]["block_0"]["mlp"]["fc2"]["kernel"]
    assert kernel.names == ("layers", "mlp", "embed") and kernel.value.shape[0] == 3
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), LOGICAL_RULES)
    assert tuple(specs[SCANNED_LAYERS]["block_0"]["mlp"]["fc2"]["kernel"]) == (
        None,
        "tensor",
        "fsdp",
    )


def test_remat_and_scan_layers_are_validated_and_ignored_by_resume(tmp_path):
    with pytest.raises(ValueError, match=r"remat='some' is not known; allowed: \('none'"):
        MODELS["based"].replace(remat="some")
    with pytest.raises(ValueError, match="scan_layers='yes' must be True or False"):
        MODELS["based"].replace(scan_layers="yes")
    from configs.demo import get_config

    run_config = get_config()
    run_config.model.lock()  # as absl's config flags hold it: only existing fields are set
    run_config.model.remat = "full"  # what --config.model.remat=full sets
    run_config.model.scan_layers = True
    model_config = ModelConfig.from_dict(run_config.model)
    assert model_config.remat == "full" and model_config.scan_layers
    saved = MODELS["based"].to_dict()
    check_compatible(saved, MODELS["based"].replace(remat="full", scan_layers=True), tmp_path)


RESUME_MODEL = dict(
    vocab_size=257,
    d_model=32,
    num_layers=5,
    layer_pattern=("base_conv", "based", "base_conv", "based", "sliding_window"),
    mlp=dict(inner_dim=64, multiple_of=32),
    based=dict(heads=2, feature_dim=4, chunk_size=8),
    sliding_window=dict(heads=2, window=8),
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from jaxbased.data import ByteTokenizer, Document, write_token_dataset

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    documents = [Document(f"doc{i}", " ".join(rng.choice(words, size=200)) + ".") for i in range(4)]
    path = tmp_path_factory.mktemp("corpus") / "data"
    return write_token_dataset(documents, ByteTokenizer(), path, validation_fraction=0.1)


def _run_config(data_path, scan_layers: bool, num_steps: int):
    from configs.demo import get_config

    config = get_config()
    config.model.update(RESUME_MODEL)
    config.model.scan_layers = scan_layers
    config.data.update(path=str(data_path), seq_len=16, batch_size=2, prefetch_threads=1)
    config.train.update(
        num_steps=num_steps,
        warmup_steps=1,
        log_every=1,
        eval_every=100,
        eval_batches=1,
        checkpoint_every=100,
        async_checkpoints=False,
        tensorboard=False,
        peak_flops=1e12,
    )
    config.sample.max_new_tokens = 0
    return config


def _trained_state(config: ModelConfig) -> TrainState:
    """A train state one AdamW update away from init (non-zero moments), unrolled."""
    from jaxbased.training.setup import optimizer_from_config

    params = nn.meta.unbox(LanguageModel(config).init(jax.random.key(5), _tokens()[:, :4]))
    _, optimizer = optimizer_from_config(_run_config("", False, 2).train)
    state = TrainState.create(params["params"], optimizer)
    grads = jax.tree.map(lambda p: jnp.cos(p * 5.0), state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state)


def test_checkpoint_resumes_in_the_other_layout_bit_exactly(corpus, tmp_path):
    from jaxbased.data import ByteTokenizer
    from jaxbased.interop.workdir import initial_data_state
    from jaxbased.sharding import global_batch
    from jaxbased.training.checkpointing import Checkpointer
    from jaxbased.training.setup import setup_run

    unrolled = ModelConfig(**RESUME_MODEL)
    state = _trained_state(unrolled)
    # Step 1 saved unrolled in one workdir and stacked (by a scanned run's config) in another;
    # each is resumed by a run of the other layout.
    for name, scan_layers in (("saved_unrolled", False), ("saved_scanned", True)):
        layout = unrolled.replace(scan_layers=scan_layers)
        metadata = {
            "model": layout.to_dict(),
            "tokenizer": ByteTokenizer().spec(),
            "data_path": str(corpus),
            "seq_len": 16,
        }
        checkpointer = Checkpointer(tmp_path / name, async_save=False)
        checkpointer.save(1, convert_layout(state, layout), initial_data_state(), metadata)
        checkpointer.close()
    scanned_run = setup_run(_run_config(corpus, True, 2), tmp_path / "saved_unrolled")
    unrolled_run = setup_run(_run_config(corpus, False, 2), tmp_path / "saved_scanned")
    try:
        assert scanned_run.resumed_step == unrolled_run.resumed_step == 1
        assert SCANNED_LAYERS in scanned_run.state.params
        assert SCANNED_LAYERS not in unrolled_run.state.params
        for run in (scanned_run, unrolled_run):
            restored = to_unrolled(run.state, unrolled)
            assert jax.tree.structure(restored) == jax.tree.structure(state)
            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # The next step in either layout: the same batch, loss and parameters.
        results = []
        for run in (scanned_run, unrolled_run):
            batch = global_batch(next(run.iterator), run.data_sharding)
            new_state, metrics = run.train_step(run.state, batch)
            results.append((float(metrics["loss"]), to_unrolled(new_state.params, unrolled)))
        np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
        moved, saved = jax.tree.leaves(results[1][1]), jax.tree.leaves(state.params)
        for a, b in zip(jax.tree.leaves(results[0][1]), moved, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
        change = max(float(np.abs(b - c).max()) for b, c in zip(moved, saved, strict=True))
        assert change > 1e-4  # the step did move the parameters
    finally:
        scanned_run.close()
        unrolled_run.close()


def test_converted_checkpoint_exports_and_imports_in_either_layout(tmp_path):
    from jaxbased.data import ByteTokenizer
    from jaxbased.interop import export_state_dict, import_state_dict, write_workdir
    from jaxbased.training.checkpointing import load_for_inference

    config = ModelConfig(**RESUME_MODEL)
    scanned = config.replace(scan_layers=True)
    params = nn.meta.unbox(LanguageModel(config).init(jax.random.key(3), _tokens()[:, :4]))
    params = jax.tree.map(np.asarray, params["params"])
    reference = export_state_dict(params, config)
    imported, _ = import_state_dict(reference, scanned)  # import: the config's layout
    assert SCANNED_LAYERS in imported
    exported = export_state_dict(imported, scanned)  # export: unrolled first
    assert sorted(exported) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(exported[key], value)
    write_workdir(tmp_path / "w", scanned, params, ByteTokenizer())  # saved stacked
    loaded_config, loaded, _ = load_for_inference(tmp_path / "w")
    assert loaded_config.scan_layers and SCANNED_LAYERS in loaded
    for a, b in zip(
        jax.tree.leaves(to_unrolled(loaded, scanned)), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
