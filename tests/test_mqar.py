"""MQAR: the generator against its definition (docs/mqar.md, Zoology's ``multiquery_ar``), the
2-layer models, state sizes against docs/mqar.md's formulas, training, and the sweep CLI."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased.config import MIXER_NAMES
from jaxbased.data.mqar import (
    IGNORE_INDEX,
    SegmentSpec,
    iterate_batches,
    make_segments,
    multiquery_ar,
    power_law_probabilities,
)
from jaxbased.model import LanguageModel
from jaxbased.mqar import (
    TrainSettings,
    answer_logits,
    init_params,
    mqar_model_config,
    state_size,
    train_mqar,
)

REPO = pathlib.Path(__file__).absolute().parents[1]


# Generator -------------------------------------------------------------------------------
def test_answers_are_the_values_paired_with_the_queried_keys():
    vocab, seq, pairs = 64, 48, 6
    data = multiquery_ar(num_examples=300, seq_len=seq, num_pairs=pairs, vocab_size=vocab, seed=3)
    assert data.inputs.shape == data.targets.shape == (300, seq)
    assert data.answer_positions.shape == data.answers.shape == (300, pairs)
    for array in (data.inputs, data.targets, data.answer_positions, data.answers):
        assert array.dtype == np.int32
    for row in range(300):
        tokens, targets = data.inputs[row], data.targets[row]
        keys, values = tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2]
        # keys from [1, V/2), values from [V/2, V), both distinct within the example
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        assert keys.min() >= 1 and keys.max() < vocab // 2
        assert values.min() >= vocab // 2 and values.max() < vocab
        value_of = dict(zip(keys.tolist(), values.tolist(), strict=True))
        answered = np.flatnonzero(targets != IGNORE_INDEX)
        assert len(answered) == pairs
        assert answered.min() >= 2 * pairs and np.all((answered - 2 * pairs) % 2 == 0)
        # each key is queried exactly once, and the target there is its value
        assert sorted(tokens[answered].tolist()) == sorted(keys.tolist())
        for position in answered:
            assert targets[position] == value_of[int(tokens[position])]
        np.testing.assert_array_equal(np.sort(data.answer_positions[row]), answered)
        # key j (j-th pair) is queried at answer_positions[j]
        np.testing.assert_array_equal(tokens[data.answer_positions[row]], keys)
        np.testing.assert_array_equal(data.answers[row], values)


def test_layout_without_random_filler_is_zoologys():
    # Zoology's docstring example: pairs, then zeros except the queries; labels at the queries.
    data = multiquery_ar(
        num_examples=50, seq_len=16, num_pairs=2, vocab_size=12, random_non_queries=False, seed=0
    )
    context = data.inputs[:, :4]
    assert np.all(context[:, 0::2] < 6) and np.all(context[:, 1::2] >= 6)
    rest = data.inputs[:, 4:].copy()
    np.put_along_axis(rest, data.answer_positions - 4, 0, axis=1)
    assert not rest.any()


def test_filler_tokens_cover_the_vocabulary():
    data = multiquery_ar(num_examples=400, seq_len=64, num_pairs=4, vocab_size=32, seed=1)
    filler = data.inputs[:, 8:][data.targets[:, 8:] == IGNORE_INDEX]
    counts = np.bincount(filler, minlength=32)
    assert counts.min() > 0.7 * counts.mean()  # uniform over [0, V), 0 included


def test_reproducible_from_a_seed_and_seeds_differ():
    kwargs = dict(num_examples=64, seq_len=64, num_pairs=8, vocab_size=128)
    first, again = multiquery_ar(seed=7, **kwargs), multiquery_ar(seed=7, **kwargs)
    other = multiquery_ar(seed=8, **kwargs)
    np.testing.assert_array_equal(first.inputs, again.inputs)
    np.testing.assert_array_equal(first.targets, again.targets)
    assert np.mean(first.inputs != other.inputs) > 0.5
    specs = [SegmentSpec(32, 2, 16), SegmentSpec(64, 4, 16)]
    train_mix = make_segments(specs, vocab_size=64, seed=(0, 0))
    test_mix = make_segments(specs, vocab_size=64, seed=(0, 1))
    np.testing.assert_array_equal(
        train_mix[1].inputs, make_segments(specs, vocab_size=64, seed=(0, 0))[1].inputs
    )
    assert np.mean(train_mix[0].inputs != test_mix[0].inputs) > 0.5


def test_first_query_gap_follows_the_power_law():
    # The first key's gap is the first draw without replacement: exactly p_g ∝ (g+1)^(a-1).
    seq, pairs, power_a = 48, 4, 0.3
    data = multiquery_ar(
        num_examples=40_000, seq_len=seq, num_pairs=pairs, vocab_size=64, power_a=power_a, seed=2
    )
    slots = (seq - 2 * pairs) // 2
    gaps = (data.answer_positions[:, 0] - 2 * pairs) // 2
    observed = np.bincount(gaps, minlength=slots) / len(gaps)
    expected = power_law_probabilities(slots, power_a)
    np.testing.assert_allclose(observed, expected, atol=0.006)
    # the second key's gap, drawn after the first was removed: P(g2 = g) = sum_f p_f p_g/(1-p_f)
    second = np.bincount((data.answer_positions[:, 1] - 2 * pairs) // 2, minlength=slots)
    expected_second = np.array(
        [
            sum(expected[f] * expected[g] / (1 - expected[f]) for f in range(slots) if f != g)
            for g in range(slots)
        ]
    )
    np.testing.assert_allclose(second / len(gaps), expected_second, atol=0.006)


def test_keys_are_uniform_over_ordered_distinct_draws():
    # keys from [1, 6): 5 * 4 = 20 ordered pairs, each with probability 1/20
    data = multiquery_ar(num_examples=20_000, seq_len=8, num_pairs=2, vocab_size=12, seed=5)
    keys = data.inputs[:, 0:4:2]
    codes = (keys[:, 0] - 1) * 5 + (keys[:, 1] - 1)
    counts = np.bincount(codes, minlength=25).reshape(5, 5)
    assert np.all(np.diag(counts) == 0)
    off_diagonal = counts[~np.eye(5, dtype=bool)] / len(codes)
    np.testing.assert_allclose(off_diagonal, 1 / 20, atol=0.006)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seq_len=63, num_pairs=4), "even"),
        (dict(seq_len=64, num_pairs=17), "does not fit"),
        (dict(seq_len=256, num_pairs=20, vocab_size=40), "distinct keys"),
        (dict(seq_len=64, num_pairs=0), "num_pairs"),
        (dict(seq_len=64, num_pairs=4, num_examples=0), "num_examples"),
        (dict(seq_len=64, num_pairs=4, power_a=0.0), "power_a"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, message):
    arguments = dict(num_examples=4, vocab_size=8192, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        multiquery_ar(**arguments)


def test_batches_come_segment_by_segment():
    segments = make_segments([SegmentSpec(16, 2, 10), SegmentSpec(32, 4, 6)], vocab_size=32, seed=0)
    shapes = [batch.inputs.shape for batch in iterate_batches(segments, 4, seed=1)]
    assert shapes == [(4, 16), (4, 16), (4, 32)]  # in mix order, remainders dropped
    mixed = [batch.seq_len for batch in iterate_batches(segments, 2, seed=3, interleave=True)]
    assert sorted(mixed) == [16] * 5 + [32] * 3


# Models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_every_mixer_builds_an_mqar_model(mixer):
    sizes = {"based.feature_dim": 4, "sliding_window.window": 8}
    config = mqar_model_config(mixer, d_model=32, vocab_size=96, **sizes)
    if mixer in ("mamba", "mamba2", "base_conv"):  # Zoology's state-space model: the mixer twice
        assert config.layer_pattern == (mixer, mixer)
    else:
        assert config.layer_pattern == ("base_conv", mixer)
    norm = "rmsnorm" if mixer in ("mamba", "mamba2") else "layernorm"
    assert config.num_layers == 2 and not config.use_mlp and config.norm == norm
    params = init_params(config, seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 24)), jnp.int32)
    logits = jax.jit(LanguageModel(config).apply)({"params": params}, tokens)
    assert logits.shape == (2, 24, 96) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_answer_logits_are_the_full_forwards_logits_at_the_answers():
    config = mqar_model_config("based", d_model=32, vocab_size=64, feature_dim=4)
    params = init_params(config, seed=1)
    data = multiquery_ar(num_examples=3, seq_len=32, num_pairs=4, vocab_size=64, seed=0)
    model = LanguageModel(config)
    full = jax.jit(model.apply)({"params": params}, data.inputs)
    picked = np.take_along_axis(np.asarray(full), data.answer_positions[:, :, None], axis=1)
    np.testing.assert_allclose(
        answer_logits(model, params, data.inputs, data.answer_positions),
        picked,
        rtol=1e-5,
        atol=1e-6,
    )


def test_mqar_model_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mixer='transformer'"):
        mqar_model_config("transformer", d_model=32)
    with pytest.raises(ValueError, match="layer_pattern"):
        mqar_model_config("based", d_model=32, layer_pattern=("based", "based"))
    with pytest.raises(ValueError, match="feature_dims=8 is neither a model field"):
        mqar_model_config("based", d_model=32, feature_dims=8)
    with pytest.raises(ValueError, match=r"window=8 is neither .* the 'based' section"):
        mqar_model_config("based", d_model=32, window=8)
    config = mqar_model_config("based", d_model=32, **{"sliding_window.window": 8})
    assert config.sliding_window.window == 8 and config.based.feature_dim == 16


# State sizes: docs/mqar.md formulas, written out independently of the caches.
def _based_formula(d_model: int, feature_dim: int, heads: int = 1) -> int:
    expanded = feature_dim * (feature_dim + 1) // 2 + feature_dim + 1
    value_dim = d_model // heads
    return heads * value_dim * expanded + heads * expanded


@pytest.mark.parametrize(("d_model", "feature_dim"), [(48, 8), (64, 16), (128, 24)])
def test_based_state_size_is_the_spec_formula(d_model, feature_dim):
    config = mqar_model_config("based", d_model=d_model, feature_dim=feature_dim)
    size = state_size(config, seq_len=1024)
    assert size.mixer == _based_formula(d_model, feature_dim)
    # BaseConv keeps its last K-1 = 2 raw inputs of conv_expand * d / 2 = 2d channels
    assert size.total == size.mixer + 2 * 2 * d_model


def test_softmax_attention_state_sizes_are_the_spec_formulas():
    for seq in (64, 256, 1024):
        attention = mqar_model_config("attention", d_model=64)
        assert state_size(attention, seq).mixer == 2 * seq * 64  # grows with the sequence
    for window in (8, 64, 1024):
        sliding = mqar_model_config("sliding_window", d_model=128, window=window)
        assert state_size(sliding, 4096).mixer == 2 * window * 128
    # BaseConv only: both layers are the mixer under test, each keeping 2 inputs of 2d channels
    assert state_size(mqar_model_config("base_conv", d_model=64), 256).mixer == 2 * (2 * 2 * 64)


def test_mamba_state_size_is_the_spec_formula_plus_its_conv_in_both_layers():
    config = mqar_model_config("mamba", d_model=64, state_dim=16)
    inner = config.mamba.expand * 64
    ssm = inner * 16  # docs/mqar.md: d_inner * d_state
    conv = (config.mamba.conv_kernel_size - 1) * inner  # its short conv's last K-1 inputs
    size = state_size(config, 256)
    assert size.mixer == size.total == 2 * (ssm + conv)  # two Mamba layers, no BaseConv
    config2 = mqar_model_config("mamba2", d_model=64, state_dim=8, head_dim=32)
    heads, groups = 128 // 32, config2.mamba2.groups
    conv2 = (config2.mamba2.conv_kernel_size - 1) * (128 + 2 * groups * 8)  # over x, B, C
    assert state_size(config2, 256).mixer == 2 * (heads * 32 * 8 + conv2)


# Training ----------------------------------------------------------------------------------
def _tiny_mix(vocab: int):
    train_mix = make_segments([SegmentSpec(32, 4, 4096)], vocab_size=vocab, seed=(0, 0))
    test_mix = make_segments([SegmentSpec(32, 4, 256)], vocab_size=vocab, seed=(0, 1))
    return train_mix, test_mix


def test_attention_learns_a_small_mqar_task_and_a_short_window_cannot():
    vocab = 256  # large enough that random filler seldom repeats a key (a false match)
    train_mix, test_mix = _tiny_mix(vocab)
    settings = TrainSettings(
        learning_rate=1e-2, batch_size=32, max_epochs=3, eval_every=64, eval_batch_size=256
    )
    attention = train_mqar(
        mqar_model_config("attention", d_model=32, vocab_size=vocab), train_mix, test_mix, settings
    )
    assert attention.final.accuracy >= 0.9  # chance is 1 / 128
    assert attention.history[0]["step"] == 64 and attention.steps <= 3 * 128
    # A window of 2 keys (the query and its predecessor) cannot see the pairs at all: chance.
    settings = TrainSettings(learning_rate=1e-2, batch_size=32, max_steps=128, eval_every=0)
    window = train_mqar(
        mqar_model_config("sliding_window", d_model=32, vocab_size=vocab, window=2),
        train_mix,
        test_mix,
        settings,
    )
    assert window.final.accuracy < 0.25
    assert not window.stopped_early


# Sweep CLI ---------------------------------------------------------------------------------
TINY_SWEEP = """
import ml_collections
from jaxbased.mqar.sweep import base_sweep_config, model_group

def get_config():
    config = base_sweep_config()
    config.vocab_size = 32
    config.train_mix = ((16, 2, 64),)
    config.test_mix = ((16, 2, 32), (32, 4, 32))
    config.state_size_seq_len = 32
    config.learning_rates = (1e-3, 3e-3)
    config.train.batch_size = 16
    config.train.max_epochs = 1
    config.train.eval_batch_size = 32
    config.models = ml_collections.ConfigDict(dict(
        based=model_group("based", dict(d_model=(16,)), dict(feature_dim=4)),
    ))
    return config
"""


def _run_cli(config_path: pathlib.Path, output: pathlib.Path, *extra: str):
    environment = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbased.cli.mqar",
            f"--config={config_path}",
            f"--output_dir={output}",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=300,
    )


def test_sweep_cli_writes_runs_summary_and_figure_and_resumes(tmp_path):
    config_path = tmp_path / "tiny_sweep.py"
    config_path.write_text(textwrap.dedent(TINY_SWEEP))
    output = tmp_path / "out"
    first = _run_cli(config_path, output)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(path.name for path in (output / "runs").iterdir())
    assert runs == ["based-d_model16-lr1.0e-03.json", "based-d_model16-lr3.0e-03.json"]
    records = [json.loads((output / "runs" / name).read_text()) for name in runs]
    for record in records:
        assert record["state_size"]["mixer"] == _based_formula(16, 4)
        assert set(record["accuracy_by_segment"]) == {"T16_P2", "T32_P4"}
        assert record["steps"] == 4
        # Per example, then averaged: 32 examples of 2 queries (T16_P2), 32 of 4 (T32_P4), so
        # the segments' accuracies are k / 64 and k / 128 and the overall one is their mean.
        by_segment = record["accuracy_by_segment"]
        assert by_segment["T16_P2"] * 64 == round(by_segment["T16_P2"] * 64)
        assert by_segment["T32_P4"] * 128 == round(by_segment["T32_P4"] * 128)
        assert record["accuracy"] == pytest.approx(np.mean(list(by_segment.values())), abs=1e-12)
    # This seeded sweep's values (after 4 steps the model gets almost no answer right); 2 / 128
    # lets a couple of answers flip under another CPU or XLA version's summation order.
    accuracies = {record["learning_rate"]: record["accuracy"] for record in records}
    assert accuracies == pytest.approx({1e-3: 0.0, 3e-3: 1 / 64}, abs=2 / 128), accuracies
    summary = json.loads((output / "summary.json").read_text())
    assert summary["runs"] == 2
    [point] = summary["points"]
    assert point["model_key"] == "based-d_model16" and point["learning_rates"] == [1e-3, 3e-3]
    best = max(records, key=lambda record: record["accuracy"])  # the first of equals, as summary
    assert point["best_learning_rate"] == best["learning_rate"]
    assert point["accuracy"] == best["accuracy"]
    assert (output / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(output.rglob(".*tmp*"))  # atomic writes leave no temporary files

    # A killed sweep resumes: the finished run is skipped, the missing one is redone.
    kept, lost = runs
    finished_at = records[0]["finished"]
    (output / "runs" / lost).unlink()
    second = _run_cli(config_path, output, "--figure", str(tmp_path / "again.png"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "trained 1 runs, 1 were finished before" in second.stderr
    assert json.loads((output / "runs" / kept).read_text())["finished"] == finished_at
    assert (output / "runs" / lost).is_file() and (tmp_path / "again.png").is_file()


def _load_config(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name[:-3], REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_paper_config_is_the_spec_protocol_and_the_cpu_config_expands():
    from jaxbased.mqar import expand_runs

    paper = _load_config("mqar_paper.py")
    assert paper.vocab_size == 8192 and paper.power_a == 0.01
    assert [tuple(segment) for segment in paper.train_mix] == [
        (64, 4, 100_000),
        (128, 8, 20_000),
        (256, 16, 20_000),
        (256, 32, 20_000),
        (256, 64, 20_000),
    ]
    assert [tuple(segment[:2]) for segment in paper.test_mix] == [
        (64, 4),
        (64, 8),
        (64, 16),
        (128, 32),
        (256, 64),
        (512, 128),
        (1024, 256),
    ]
    assert all(segment[2] == 1000 for segment in paper.test_mix)
    assert tuple(paper.learning_rates) == (1e-3, 3.2e-3, 1e-2, 3.2e-2)
    assert paper.train.weight_decay == 0.1 and paper.train.early_stop_accuracy == 0.99
    runs = expand_runs(paper)
    models = {run.model_key for run in runs}
    assert len(models) == 2 + 9 + 8 + 9 + 9 and len(runs) == 4 * len(models)
    windows = sorted(dict(run.grid)["window"] for run in runs if run.mixer == "sliding_window")
    assert windows[0] == 9 and windows[-1] == 1025  # Zoology's w sees w + 1 keys
    cpu_runs = expand_runs(_load_config("mqar_cpu.py"))
    assert {run.mixer for run in cpu_runs} == {"attention", "based", "sliding_window", "base_conv"}
    # The recorded sweep: the default's runs (same names, so they are shared) plus the SSMs.
    all_runs = expand_runs(_load_config("mqar_cpu_all.py"))
    assert {run.name for run in cpu_runs} < {run.name for run in all_runs}
    extra = [run for run in all_runs if run.name not in {r.name for r in cpu_runs}]
    assert sorted(run.mixer for run in extra) == (
        ["cca_attention"] * 2
        + ["decay_attention"]
        + ["mamba"] * 2
        + ["mamba2"] * 3  # the two of the 4-epoch budget and mamba2_long's
        + ["seqboat"] * 2
        + ["transnormer"] * 2
    )
    # Only mamba2_long trains longer than the sweep's 4 epochs (its cosine spans its 8).
    assert {run.group: dict(run.train) for run in extra if run.train} == {
        "mamba2_long": {"max_epochs": 8}
    }
    # The CCA rows' states match BASED's F = 16 and F = 8 at the test length (docs/mqar.md).
    cca_states = sorted(
        state_size(mqar_model_config("cca_attention", **dict(run.grid + run.fixed)), 256).mixer
        for run in extra
        if run.mixer == "cca_attention"
    )
    assert cca_states == [2 * 32 * (16 + 16 + 16), 2 * 64 * (8 + 4 + 64)]
    transnormer_states = sorted(
        state_size(mqar_model_config("transnormer", **dict(run.grid + run.fixed)), 256).mixer
        for run in extra
        if run.mixer == "transnormer"
    )
    # kv [H, 2e, e] + k [H, 2e] with LRPE's doubled keys: e = 16 (4 heads) and e = 64
    assert transnormer_states == [4 * (32 * 16 + 32), 1 * (128 * 64 + 128)]
    seqboat_states = sorted(
        state_size(mqar_model_config("seqboat", **dict(run.grid + run.fixed)), 256).mixer
        for run in extra
        if run.mixer == "seqboat"
    )
    assert seqboat_states == [64 * 16 + 12 * (32 + 128), 64 * 16 + 56 * (32 + 128)]
    with pytest.raises(ValueError, match="not in the config"):
        expand_runs(paper, groups=["hyena"])


def test_a_groups_train_overrides_change_its_settings_and_only_its_fingerprint():
    from jaxbased.mqar import expand_runs
    from jaxbased.mqar.sweep import base_sweep_config, model_group, run_fingerprint, train_settings

    config = base_sweep_config()
    config.models.based = model_group("based", dict(d_model=(16,)), dict(feature_dim=4))
    plain = expand_runs(config)
    config.models.mamba = model_group(
        "mamba", dict(d_model=(16,)), train=dict(max_epochs=3, warmup_steps=7)
    )
    runs = expand_runs(config)
    based, mamba = runs[0], runs[-1]
    # Adding a group with overrides leaves the other groups' runs (and hashes) as they were.
    assert based == plain[0] and based.train == ()
    assert run_fingerprint(config, based) == run_fingerprint(base_sweep_config(), plain[0])
    settings = train_settings(config, mamba.learning_rate, mamba.train)
    assert (settings.max_epochs, settings.warmup_steps) == (3, 7)
    assert settings.batch_size == config.train.batch_size  # the rest is the sweep's
    assert train_settings(config, based.learning_rate, based.train).max_epochs == 32
    import dataclasses

    longer = dataclasses.replace(mamba, train=(("max_epochs", 4), ("warmup_steps", 7)))
    assert run_fingerprint(config, longer) != run_fingerprint(config, mamba)
    config.models.mamba = model_group("mamba", dict(d_model=(16,)), train=dict(epochs=3))
    with pytest.raises(ValueError, match=r"train overrides \['epochs'\] are not fields"):
        expand_runs(config)


def test_a_groups_train_mix_is_its_own_data_and_only_its_fingerprint():
    from jaxbased.mqar import expand_runs
    from jaxbased.mqar.sweep import (
        base_sweep_config,
        build_data,
        data_description,
        model_group,
        run_fingerprint,
    )

    config = base_sweep_config()
    config.train_mix = ((16, 2, 8),)
    config.test_mix = ((16, 2, 4),)
    config.models.based = model_group("based", dict(d_model=(16,)), dict(feature_dim=4))
    plain = expand_runs(config)
    config.models.mamba = model_group("mamba", dict(d_model=(16,)), train_mix=[(16, 2, 12)])
    runs = expand_runs(config)
    based, mamba = runs[0], runs[-1]
    assert based == plain[0] and based.train_mix == ()
    assert mamba.train_mix == ((16, 2, 12),)
    assert run_fingerprint(config, based) == run_fingerprint(config, plain[0])
    same_model_sweep_mix = dataclasses.replace(mamba, train_mix=())
    assert run_fingerprint(config, mamba) != run_fingerprint(config, same_model_sweep_mix)
    assert data_description(config, mamba.train_mix)["train_mix"] == [[16, 2, 12]]
    train, test = build_data(config, mamba.train_mix)
    sweep_train, sweep_test = build_data(config)
    assert [segment.inputs.shape for segment in train] == [(12, 16)]
    assert [segment.inputs.shape for segment in sweep_train] == [(8, 16)]
    # The same seed draws the larger mix, and the test mix is the sweep's.
    np.testing.assert_array_equal(test[0].inputs, sweep_test[0].inputs)
    for bad in ([(16, 2)], [(16, 0, 12)], [(16, 2, 1.5)]):
        config.models.mamba = model_group("mamba", dict(d_model=(16,)), train_mix=bad)
        with pytest.raises(ValueError, match="model group 'mamba': train_mix entry"):
            expand_runs(config)
