"""train.py's EchoAtt distillation mode (jaxbased.training.distill_run): the loss of a step
against the loss computed apart on the same batch, the switch to language modelling, resuming
in the right phase, and the config errors."""

import json
import pathlib

import numpy as np
import optax
import pytest

from configs.demo import get_config
from jaxbased import LanguageModel, ModelConfig
from jaxbased.data import ByteTokenizer, Document, write_token_dataset
from jaxbased.data.pipeline import make_iterator, training_batches
from jaxbased.data.token_store import TokenDataset
from jaxbased.echoatt import student_params
from jaxbased.interop.workdir import write_workdir
from jaxbased.training.checkpointing import load_for_inference
from jaxbased.training.distill_run import DistillSettings, Teacher, student_config
from jaxbased.training.distillation import (
    DistillationWeights,
    block_boundaries,
    distillation_token_losses,
)
from jaxbased.training.loop import _checksum, train
from tests.conftest import init_model
from tests.test_echoatt_similarity import numpy_similarity

TEACHER = dict(
    vocab_size=257,
    d_model=16,
    num_layers=3,
    layer_pattern=("attention",) * 3,
    mlp=dict(inner_dim=32, multiple_of=16),
    attention=dict(heads=2, rotary_fraction=0.5),
)
SEQ_LEN, BATCH = 16, 2
DISTILL_STEPS, NUM_STEPS = 3, 5
DISTILL_KEYS = {"distill/hidden_mse", "distill/kl", "distill/teacher_ce", "distill/lm_loss"}


def teacher_config() -> ModelConfig:
    """``TEACHER`` over the demo config's model (the sections its layers do not use)."""
    config = get_config()
    config.model.update(TEACHER)
    return ModelConfig.from_dict(config.model)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    documents = [Document(f"doc{i}", " ".join(rng.choice(words, size=80)) + ".") for i in range(6)]
    path = tmp_path_factory.mktemp("corpus") / "data"
    return write_token_dataset(documents, ByteTokenizer(), path, validation_fraction=0.1)


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory) -> pathlib.Path:
    """A teacher written directly as a workdir: random weights whose queries and keys are
    scaled up, so that its attention maps are sharp and unlike layer to layer, and whose
    attention outputs are scaled up (a sharing student then differs from it clearly)."""
    config = teacher_config()
    _, params = init_model(config, seed=3)
    for layer in range(config.num_layers):
        mixer = params[f"layers_{layer}"]["mixer"]
        mixer["qkv_proj"]["kernel"] = mixer["qkv_proj"]["kernel"].at[:, :2].multiply(40.0)
        mixer["out_proj"]["kernel"] = mixer["out_proj"]["kernel"] * 20.0
    workdir = tmp_path_factory.mktemp("teacher") / "run"
    write_workdir(workdir, config, params, ByteTokenizer())
    return workdir


def student_run_config(corpus, teacher, num_steps: int, **distill):
    config = get_config()
    config.model.update(TEACHER)
    config.data.update(path=str(corpus), seq_len=SEQ_LEN, batch_size=BATCH, prefetch_threads=1)
    config.train.update(
        num_steps=num_steps,
        warmup_steps=1,
        log_every=1,
        eval_every=1000,
        eval_batches=1,
        checkpoint_every=1,
        keep_checkpoints=10,
        async_checkpoints=False,
        tensorboard=False,
        peak_flops=1e11,
    )
    config.sample.max_new_tokens = 0
    config.distill.update(teacher_workdir=str(teacher), steps=DISTILL_STEPS, shared_layers="2")
    config.distill.update(distill)
    return config


def train_lines(workdir: pathlib.Path) -> dict[int, dict]:
    """The last logged train line of each step (a resumed run logs its steps again)."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if line["split"] == "train"}


def first_batches(corpus: pathlib.Path, count: int) -> list[np.ndarray]:
    """The run's first ``count`` training batches, read apart from the loop."""
    batches = training_batches(TokenDataset.open(corpus), seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    iterator = make_iterator(batches, prefetch_threads=0)
    return [np.asarray(next(iterator)) for _ in range(count)]


def reference_distillation(config, params, teacher_params, batch) -> dict[str, float]:
    """The distillation loss and its terms of ``params`` on ``batch``, from separate forward
    passes of the two models and ``distillation_token_losses``."""
    inputs = batch[:, :-1]
    student, teacher = LanguageModel(config), LanguageModel(teacher_config())
    student_logits, student_blocks = student.apply(
        {"params": params}, inputs, method="with_block_outputs"
    )
    teacher_logits, teacher_blocks = teacher.apply(
        {"params": teacher_params}, inputs, method="with_block_outputs"
    )
    boundaries = block_boundaries(config)
    loss, parts = distillation_token_losses(
        student_logits,
        teacher_logits,
        [student_blocks[i] for i in boundaries],
        [teacher_blocks[i] for i in boundaries],
    )
    language = optax.softmax_cross_entropy_with_integer_labels(student_logits, batch[:, 1:])
    return {
        "loss": float(loss.mean()),
        **{f"distill/{name}": float(values.mean()) for name, values in parts.items()},
        "distill/lm_loss": float(language.mean()),
    }


def language_model_loss(config, params, batch) -> float:
    logits = LanguageModel(config).apply({"params": params}, batch[:, :-1])
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean())


@pytest.fixture(scope="module")
def stopped_then_resumed(corpus, teacher_workdir, tmp_path_factory) -> pathlib.Path:
    """A student run stopped after 2 of its 3 distillation steps (``num_steps=2``), then run
    again to ``NUM_STEPS``: it resumes from step 2's checkpoint with step 3 left to distill."""
    workdir = tmp_path_factory.mktemp("student") / "run"
    first = train(student_run_config(corpus, teacher_workdir, 2), workdir)
    assert first.final_step == 2
    second = train(student_run_config(corpus, teacher_workdir, NUM_STEPS), workdir)
    assert second.final_step == NUM_STEPS and second.initial_eval is None  # resumed
    return workdir


def test_distillation_step_computes_the_loss_and_switches_to_language_modelling(
    stopped_then_resumed, corpus, teacher_workdir
):
    workdir = stopped_then_resumed
    lines = train_lines(workdir)
    batches = first_batches(corpus, NUM_STEPS)
    assert [lines[s]["batch_checksum"] for s in lines] == [_checksum(b) for b in batches]
    # Steps 1..3 distill (the resumed run's step 3 too), steps 4 and 5 do not.
    assert [set(lines[s]) >= DISTILL_KEYS for s in sorted(lines)] == [True] * 3 + [False] * 2

    teacher_config, teacher_params, _ = load_for_inference(teacher_workdir)
    student = teacher_config.replace(attention_sharing={2: None})
    saved_config = load_for_inference(workdir, step=1)[0]
    assert saved_config == student  # layer 2 shares layer 1's probabilities
    assert student.attention_sharing == ((2, 1),)

    # Step 1 from the teacher's weights, step 3 (after the resume) from step 2's checkpoint.
    starts = {1: student_params(teacher_params, student)}
    starts[3] = load_for_inference(workdir, step=2)[1]
    for step, params in starts.items():
        expected = reference_distillation(student, params, teacher_params, batches[step - 1])
        for key, value in expected.items():
            np.testing.assert_allclose(lines[step][key], value, rtol=2e-5, atol=1e-6, err_msg=key)
    assert lines[1]["distill/kl"] > 1e-4 and lines[1]["distill/hidden_mse"] > 1e-4
    # The language-model steps: the loss is the cross-entropy of the previous step's weights.
    for step in (4, 5):
        params = load_for_inference(workdir, step=step - 1)[1]
        expected = language_model_loss(student, params, batches[step - 1])
        np.testing.assert_allclose(lines[step]["loss"], expected, rtol=2e-5)
    np.testing.assert_allclose(
        lines[3]["distill/lm_loss"],
        language_model_loss(student, starts[3], batches[2]),
        rtol=2e-5,
    )
    # The student learned: its distillation loss on the first batch went down.
    final = load_for_inference(workdir)[1]
    before = reference_distillation(student, starts[1], teacher_params, batches[0])["loss"]
    after = reference_distillation(student, final, teacher_params, batches[0])["loss"]
    assert after < before


@pytest.mark.parametrize(
    ("distill", "model", "message"),
    [
        ({"shared_layers": "0"}, {}, "distill.shared_layers='0': .*layer 0 cannot share"),
        ({"shared_layers": "5"}, {}, "distill.shared_layers='5': .*outside the layers 0..2"),
        ({"shared_layers": "2:2"}, {}, "distill.shared_layers='2:2': .*must be an earlier"),
        ({"shared_layers": "two"}, {}, "distill.shared_layers='two': 'two' is not a layer"),
        ({"shared_layers": "1,1"}, {}, "distill.shared_layers='1,1': layer 1 is listed twice"),
        ({}, {"scan_layers": True}, "model.scan_layers=True"),
        ({}, {"attention_sharing": ((2, 1),)}, "model.attention_sharing=.*must be empty"),
        ({"share_fraction": 0.5}, {}, "set exactly one of distill.shared_layers"),
        ({"shared_layers": "", "share_fraction": 1.5}, {}, r"distill.share_fraction=1.5 must"),
        ({"shared_layers": "", "share_fraction": 0.1}, {}, "share_fraction=0.1 .* rounds to 0"),
        ({"steps": -2}, {}, "distill.steps=-2 must be"),
        ({"kl_weight": -1.0}, {}, "distill.kl_weight=-1.0 must be a number >= 0"),
        ({"teacher_workdir": "/nonexistent/teacher"}, {}, "distill.teacher_workdir=.*not exist"),
        ({}, {"d_model": 32}, "teacher's model differs from config.model .*d_model: teacher 16"),
    ],
)
def test_bad_distillation_settings_are_named(
    corpus, teacher_workdir, tmp_path, distill, model, message
):
    config = student_run_config(corpus, teacher_workdir, NUM_STEPS, **distill)
    config.model.update(model)
    workdir = tmp_path / "student"
    with pytest.raises(ValueError, match=message):
        train(config, workdir)
    assert not workdir.exists()  # nothing is created before the settings are checked


def test_a_teacher_workdir_without_checkpoints_is_named(corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    config = student_run_config(corpus, tmp_path / "empty", NUM_STEPS)
    with pytest.raises(ValueError, match=r"distill.teacher_workdir=.*holds no checkpoints"):
        train(config, tmp_path / "student")


def test_share_fraction_shares_the_most_alike_layers():
    config = ModelConfig.from_preset("attn_tiny", vocab_size=257, init_std=0.2)
    _, params = init_model(config, seed=5)
    teacher = Teacher(pathlib.Path("unused"), config, params, ByteTokenizer())
    rng = np.random.default_rng(6)
    validation = [rng.integers(0, 256, size=(2, 11)).astype(np.int32) for _ in range(3)]
    settings = DistillSettings(
        teacher_workdir=pathlib.Path("unused"),
        steps=1,
        shared_layers=None,
        share_fraction=0.5,
        similarity_sequences=5,
        weights=DistillationWeights(),
    )
    student = student_config(settings, config, teacher, validation)
    # NumPy float64: each layer's mean cosine similarity to the others on the first 5 rows;
    # round(0.5 * 4) = 2 of the layers 1..3 share, each with the nearest earlier unshared one.
    rows = np.concatenate(validation)[:5, :-1]
    similarity = numpy_similarity(params, rows, config)
    scores = (similarity.sum(1) - np.diag(similarity)) / 3
    chosen = sorted(sorted((1, 2, 3), key=lambda layer: -scores[layer])[:2])
    expected = tuple(
        (layer, max(other for other in range(layer) if other not in chosen)) for layer in chosen
    )
    assert student.attention_sharing == expected
    assert student.replace(attention_sharing=()) == config
