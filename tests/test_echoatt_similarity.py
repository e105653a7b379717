"""EchoAtt's layer choice (jaxbased.echoatt, jaxbased-attention-similarity): the attention-map
similarity against NumPy float64, the largest-gap rule on hand-made scores, and the CLI on a
tiny random workdir."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig
from jaxbased.data.corpus import Document
from jaxbased.data.token_store import TokenDataset, write_token_dataset
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.echoatt import (
    attention_similarity,
    largest_gap_split,
    mean_similarity,
    most_similar_layers,
    student_params,
    valid_sharing,
)
from jaxbased.interop import write_workdir
from tests import reference_numpy as ref
from tests.conftest import init_model

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("attn_tiny", vocab_size=257, init_std=0.2, **overrides)


def numpy_similarity(params, windows: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Mean over rows and heads of the cosine between layers' flattened ``T x T`` maps."""
    _, maps = ref.shared_attention_model_forward(params, windows, config)
    layers = sorted(maps)
    flat = np.stack([maps[layer].reshape(*maps[layer].shape[:2], -1) for layer in layers])
    unit = flat / np.linalg.norm(flat, axis=-1, keepdims=True)  # [L, B, H, T*T]
    return np.einsum("lbhn,mbhn->lmbh", unit, unit).mean(axis=(2, 3))


def test_largest_gap_split_on_hand_made_scores():
    # sorted: 0.2 (0), 0.3 (4), 0.8 (1), 0.85 (2), 0.9 (3): the largest gap is 0.3 -> 0.8
    kept, shared, threshold = largest_gap_split([0.2, 0.8, 0.85, 0.9, 0.3])
    assert kept == [0, 4] and shared == [1, 2, 3]
    assert threshold == pytest.approx(0.55)
    # the gap at the top: only the most similar layer shares
    assert largest_gap_split([0.1, 0.12, 0.15, 0.9]) == ([0, 1, 2], [3], pytest.approx(0.525))
    with pytest.raises(ValueError, match="at least 2"):
        largest_gap_split([0.5])


def test_mean_similarity_leaves_out_the_diagonal():
    similarity = np.array([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    np.testing.assert_allclose(mean_similarity(similarity), [0.3, 0.4, 0.5])


def test_sharing_proposals_respect_the_rules():
    config = tiny_config()
    # layer 0 never shares; every other proposed layer gets the nearest earlier kept layer
    assert valid_sharing(config, [0, 2, 3]) == ((2, 1), (3, 1))
    similarity = np.array(
        [
            [1.0, 0.1, 0.1, 0.1],
            [0.1, 1.0, 0.9, 0.5],
            [0.1, 0.9, 1.0, 0.8],
            [0.1, 0.5, 0.8, 1.0],
        ]
    )
    # mean similarities: 0.1, 0.5, 0.6, 0.467 -> the two highest are layers 2 and 1
    assert most_similar_layers(config, similarity, 2) == ((1, 0), (2, 0))
    assert most_similar_layers(config, similarity, 0) == ()


def test_similarity_matches_numpy():
    model, params = init_model(tiny_config())
    windows = np.random.default_rng(0).integers(0, 256, size=(3, 10)).astype(np.int32)
    got = attention_similarity(model, params, [windows[:2], windows[2:]])
    np.testing.assert_allclose(got, numpy_similarity(params, windows, model.config), atol=1e-5)
    assert got.shape == (4, 4)
    np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-5)


def test_student_params_drop_query_and_key_and_keep_the_rest():
    teacher_model, teacher = init_model(tiny_config())
    student_config = tiny_config(attention_sharing={2: None})
    student = student_params(teacher, student_config)
    student_shapes = jax.eval_shape(
        LanguageModel(student_config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )["params"]
    assert jax.tree.structure(student) == jax.tree.structure(nn.meta.unbox(student_shapes))
    np.testing.assert_array_equal(
        student["layers_2"]["mixer"]["v_proj"]["kernel"],
        np.asarray(teacher["layers_2"]["mixer"]["qkv_proj"]["kernel"])[:, 2],
    )
    np.testing.assert_array_equal(
        student["layers_2"]["mlp"]["fc1"]["kernel"], teacher["layers_2"]["mlp"]["fc1"]["kernel"]
    )
    # the first two layers are untouched, so their outputs agree exactly
    tokens = jnp.asarray(np.arange(8, dtype=np.int32)[None])
    _, teacher_outputs = teacher_model.apply(
        {"params": teacher}, tokens, method="with_block_outputs"
    )
    _, student_outputs = LanguageModel(student_config).apply(
        {"params": student}, tokens, method="with_block_outputs"
    )
    np.testing.assert_allclose(student_outputs[1], teacher_outputs[1], atol=1e-6)


def test_attention_similarity_cli(tmp_path):
    model, params = init_model(tiny_config())
    tokenizer = ByteTokenizer()
    workdir = tmp_path / "run"
    write_workdir(workdir, model.config, params, tokenizer)
    data = write_token_dataset(
        [Document("d", "attention maps of a tiny model " * 6)],
        tokenizer,
        tmp_path / "data",
        validation_fraction=0.0,
        progress=False,
    )
    output = tmp_path / "similarity.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbased.cli.attention_similarity",
            f"--workdir={workdir}",
            f"--data={data}",
            "--split=train",
            "--seq_len=12",
            "--num_sequences=5",
            "--batch_size=2",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    tokens = np.asarray(TokenDataset.open(data).tokens("train"))[:60].reshape(5, 12)
    expected = numpy_similarity(params, tokens, model.config)
    np.testing.assert_allclose(result["similarity"], expected, atol=1e-5)
    assert result["layers"] == [0, 1, 2, 3] and result["sequences"] == 5
    np.testing.assert_allclose(result["mean_similarity"], mean_similarity(expected), atol=1e-5)
    assert sorted(result["kept"] + result["proposed"]) == [0, 1, 2, 3]
    assert ModelConfig.from_dict(
        {**model.config.to_dict(), "attention_sharing": result["attention_sharing"]}
    ).attention_sharing == tuple(map(tuple, result["attention_sharing"]))
    assert pathlib.Path(result["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(done.stdout.strip().splitlines()[-1])["kept"] == result["kept"]


def test_attention_similarity_cli_rejects_a_bad_flag(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbased.cli.attention_similarity",
            f"--workdir={tmp_path}",
            f"--data={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 2
    assert "is not a prepared dataset" in done.stderr
