"""Evaluation: the scorer, perplexity and the lm-evaluation-harness model against hand
computations (direct forwards, float64 log-softmax)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig, generate
from jaxbased.data.corpus import Document
from jaxbased.data.token_store import TokenDataset, write_token_dataset
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.evaluation import (
    LanguageModelScorer,
    evaluate_perplexity,
    perplexity_of_tokens,
    rolling_windows,
)
from jaxbased.interop import write_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_LENGTH = 32


HAND_LENGTH = 64  # hand computations run one compiled forward of this many tokens


class ByteModel:
    """A tiny byte-level BASED model (random weights, window 16) and a compiled forward for
    hand computations: ``logits(tokens)`` pads to 64 tokens (the model is causal) and returns
    float64 ``[len(tokens), V]``."""

    def __init__(self) -> None:
        self.config = ModelConfig.from_preset(
            "based_tiny", vocab_size=257, based={"chunk_size": 16}
        )
        self.model = LanguageModel(self.config)
        shapes = jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
            "params"
        ]
        rng = np.random.default_rng(7)
        self.params = jax.tree.map(
            lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32),
            nn.meta.unbox(shapes),
        )
        self.tokenizer = ByteTokenizer()
        self._forward = jax.jit(lambda params, tokens: self.model.apply({"params": params}, tokens))

    def logits(self, tokens) -> np.ndarray:
        tokens = list(tokens)
        padded = np.zeros((1, HAND_LENGTH), np.int32)
        padded[0, : len(tokens)] = tokens
        return np.asarray(
            self._forward(self.params, jnp.asarray(padded))[0, : len(tokens)], np.float64
        )

    def log_softmax(self, tokens) -> np.ndarray:
        logits = self.logits(tokens)
        shifted = logits - logits.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def byte_model() -> ByteModel:
    return ByteModel()


def hand_loglikelihood(byte_model, context, continuation, max_length=MAX_LENGTH):
    """log p(continuation | context) and greedy, from one forward of the (tail of the) tokens."""
    whole = (list(context) + list(continuation))[-(max_length + 1) :]
    logprobs = byte_model.log_softmax(whole[:-1])
    positions = range(len(whole) - 1 - len(continuation), len(whole) - 1)
    total = sum(logprobs[i, whole[i + 1]] for i in positions)
    greedy = all(int(np.argmax(logprobs[i])) == whole[i + 1] for i in positions)
    return total, greedy


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 110))
    windows = rolling_windows(tokens, prefix_token=0, max_length=4)
    # Blocks of 4 after the token before them; the short last block gets a full window.
    assert windows == [
        ([0], [100, 101, 102, 103]),
        ([103], [104, 105, 106, 107]),
        ([105, 106, 107], [108, 109]),
    ]
    assert rolling_windows([], 0, 4) == []


def test_rolling_windows_agree_with_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    for length in (1, 3, 4, 5, 9, 17):
        for max_length in (1, 4, 7):
            tokens = list(range(1, length + 1))
            expected = [
                utils.make_disjoint_window(window)
                for window in utils.get_rolling_token_windows(tokens, 0, max_length, 1)
            ]
            assert rolling_windows(tokens, 0, max_length) == [
                (list(a), list(b)) for a, b in expected
            ]


def test_loglikelihood_matches_a_direct_forward(byte_model):
    tokenizer = byte_model.tokenizer
    scorer = LanguageModelScorer(
        byte_model.model, byte_model.params, tokenizer, batch_size=3, max_length=MAX_LENGTH
    )
    requests = [
        (tokenizer.encode("The cat"), tokenizer.encode(" sat")),
        (tokenizer.encode("a"), tokenizer.encode("b")),
        (tokenizer.encode("x" * 50), tokenizer.encode("yz")),  # truncated to its tail
        ([tokenizer.eos_id], tokenizer.encode("hello")),
        (tokenizer.encode("0123456789"), tokenizer.encode("0123456789")),
    ]
    results = scorer.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(requests, results, strict=True):
        expected, expected_greedy = hand_loglikelihood(byte_model, context, continuation)
        assert abs(logprob - expected) <= 1e-4 * max(1.0, abs(expected))
        assert greedy == expected_greedy
    assert scorer.loglikelihood([([1, 2], [])]) == [(0.0, True)]
    with pytest.raises(ValueError, match="empty context"):
        scorer.loglikelihood([([], [1])])


def test_rolling_loglikelihood_sums_its_windows(byte_model):
    tokenizer = byte_model.tokenizer
    scorer = LanguageModelScorer(
        byte_model.model, byte_model.params, tokenizer, batch_size=2, max_length=MAX_LENGTH
    )
    documents = [tokenizer.encode("short"), tokenizer.encode("a longer document " * 5)]
    totals = scorer.rolling_loglikelihood(documents)
    for document, total in zip(documents, totals, strict=True):
        # stream[t] for t >= 1 is predicted once: the first 32 after end-of-text, then blocks of
        # 32 targets, each seeing the tokens of its 33-token window before it (lm-eval's rule).
        stream, expected = [tokenizer.eos_id, *document], 0.0
        blocks = [(1, min(MAX_LENGTH + 1, len(stream)), 0)]
        while blocks[-1][1] < len(stream):
            first = blocks[-1][1]
            last = min(first + MAX_LENGTH, len(stream))
            blocks.append((first, last, last - 1 - MAX_LENGTH))
        for first, last, start in blocks:
            logprobs = byte_model.log_softmax(stream[start : last - 1])
            expected += sum(logprobs[t - 1 - start, stream[t]] for t in range(first, last))
        assert abs(total - expected) <= 1e-4 * abs(expected)
    assert len(blocks) == 3  # the long document needed three windows


def test_generate_until_cuts_at_the_first_stop_string(byte_model):
    model, params, tokenizer = byte_model.model, byte_model.params, byte_model.tokenizer
    scorer = LanguageModelScorer(model, params, tokenizer, batch_size=2, max_length=MAX_LENGTH)
    contexts = [tokenizer.encode(text) for text in ("abc", "hello there", "q")]
    plain = scorer.generate_until(contexts, until=(), max_new_tokens=6)
    for context, text in zip(contexts, plain, strict=True):
        reference = generate(model, params, [context], max_new_tokens=6, temperature=0)
        tokens = [t for t in reference.tokens[0] if t != tokenizer.eos_id]
        assert text == tokenizer.decode(tokens)
    # Stop strings of one and of two characters, taken from the continuations themselves.
    stops = sorted({text[1:3] for text in plain if len(text) >= 3} | {plain[0][-1:] or "z"})
    cut = scorer.generate_until(contexts, until=stops, max_new_tokens=6)
    for text, short in zip(plain, cut, strict=True):
        expected = text
        for stop in stops:
            expected = expected.split(stop)[0]
        assert short == expected
    assert scorer.stop_tokens(["\n"]) == (ord("\n"), tokenizer.eos_id)


def test_perplexity_of_a_uniform_model_is_the_padded_vocabulary(byte_model):
    zeros = jax.tree.map(np.zeros_like, byte_model.params)
    tokens = np.arange(70) % 200
    result = perplexity_of_tokens(byte_model.model, zeros, tokens, seq_len=16, batch_size=3)
    assert result.tokens == 69 and result.windows == 5
    padded = byte_model.config.padded_vocab_size
    assert abs(result.perplexity - padded) <= 1e-4 * padded
    assert abs(result.bits_per_token - math.log2(padded)) <= 1e-5


def test_perplexity_over_a_dataset_matches_a_hand_computation(byte_model, tmp_path):
    documents = [Document(f"d{i}", f"document {i}: " + "lorem ipsum " * (i + 2)) for i in range(6)]
    dataset = TokenDataset.open(
        write_token_dataset(
            documents,
            byte_model.tokenizer,
            tmp_path / "data",
            validation_fraction=0.4,
            progress=False,
        )
    )
    tokens = np.asarray(dataset.tokens("validation"), np.int64)
    result = evaluate_perplexity(
        byte_model.model, byte_model.params, dataset, seq_len=16, batch_size=3
    )
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, 16):  # windows of 17 tokens every 16
        window = tokens[start : start + 17]
        logprobs = byte_model.log_softmax(window[:-1])
        total -= sum(logprobs[i, window[i + 1]] for i in range(len(window) - 1))
        count += len(window) - 1
    assert result.tokens == count == len(tokens) - 1
    assert abs(result.loss - total / count) <= 1e-5 * total / count
    assert abs(result.perplexity - math.exp(total / count)) <= 1e-4 * math.exp(total / count)
    limited = evaluate_perplexity(
        byte_model.model, byte_model.params, dataset, seq_len=16, batch_size=3, max_tokens=20
    )
    assert limited.tokens == 19


def test_perplexity_cli(byte_model, tmp_path):
    workdir = tmp_path / "run"
    write_workdir(workdir, byte_model.config, byte_model.params, byte_model.tokenizer)
    data = write_token_dataset(
        [Document("d", "some text to score " * 10)],
        byte_model.tokenizer,
        tmp_path / "data",
        progress=False,
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbased.cli.perplexity",
            f"--workdir={workdir}",
            f"--data={data}",
            "--seq_len=16",
            "--batch_size=3",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    expected = evaluate_perplexity(
        byte_model.model, byte_model.params, TokenDataset.open(data), seq_len=16, batch_size=3
    )
    assert abs(printed["loss"] - expected.loss) <= 1e-6 * expected.loss
    assert printed["tokens"] == expected.tokens


TASKS = {
    "choice": """
task: jaxbased_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""",
    "generate": """
task: jaxbased_local_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["q", "\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""",
    "rolling": """
task: jaxbased_local_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""",
}


def test_lm_eval_model_runs_local_tasks_with_the_hand_computed_scores(byte_model, tmp_path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from jaxbased.evaluation.lm_eval_model import JaxBasedLM

    model, params, tokenizer = byte_model.model, byte_model.params, byte_model.tokenizer
    workdir = tmp_path / "run"
    write_workdir(workdir, model.config, params, tokenizer)

    # Multiple choice (loglikelihood): the hand computation picks the best " choice".
    questions = [("Colour of the sky:", ["blue", "green", "red"]), ("1 + 1 =", ["2", "3"])]
    questions += [("Capital of France is", ["Paris", "Rome", "Berlin", "Oslo"])]
    choice_docs, correct = [], 0
    for index, (question, choices) in enumerate(questions):
        scores = [
            hand_loglikelihood(byte_model, tokenizer.encode(question), tokenizer.encode(" " + c))[0]
            for c in choices
        ]
        best = int(np.argmax(scores))
        label = best if index == 1 else (best + 1) % len(choices)  # one right, two wrong
        correct += best == label
        choice_docs.append({"question": question, "choices": choices, "label": label})
    # Generation: answers are the greedy continuations (cut at "q" or a newline) for 3 of 5.
    prompts = ["The answer is", "abc", "Hello", "x y z", "0 1 2"]
    gen_docs = []
    for index, prompt in enumerate(prompts):
        result = generate(
            model, params, [tokenizer.encode(prompt)], max_new_tokens=6, temperature=0
        )
        text = tokenizer.decode([t for t in result.tokens[0] if t != tokenizer.eos_id])
        text = text.split("q")[0].split("\n")[0]
        gen_docs.append({"prompt": prompt, "answer": text if index < 3 else text + "#wrong"})
    # Rolling log-likelihood: bits per byte of two texts (one longer than max_length).
    texts = ["tiny text", "a somewhat longer text that needs two windows of the model"]
    rolling_docs = [{"text": text} for text in texts]
    scorer = LanguageModelScorer(model, params, tokenizer, max_length=MAX_LENGTH)
    logprobs = scorer.rolling_loglikelihood([tokenizer.encode(t) for t in texts])
    nbytes = sum(len(t.encode()) for t in texts)
    expected_bits_per_byte = -sum(logprobs) / nbytes / math.log(2)

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    for name, docs in (("choice", choice_docs), ("generate", gen_docs), ("rolling", rolling_docs)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (tasks_dir / f"{name}.yaml").write_text(TASKS[name].format(data=data))

    lm = JaxBasedLM(workdir=str(workdir), batch_size=2, max_length=MAX_LENGTH)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["jaxbased_local_choice", "jaxbased_local_generate", "jaxbased_local_rolling"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
    assert correct == 1
    assert results["jaxbased_local_choice"]["acc,none"] == pytest.approx(1 / 3)
    assert results["jaxbased_local_generate"]["exact_match,none"] == pytest.approx(3 / 5)
    assert results["jaxbased_local_rolling"]["bits_per_byte,none"] == pytest.approx(
        expected_bits_per_byte, rel=1e-5
    )


def test_lm_eval_command_line_knows_the_jaxbased_model():
    pytest.importorskip("lm_eval")
    script = (
        "import sys\n"
        "import jaxbased.evaluation.lm_eval_model\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('jaxbased').__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "JaxBasedLM"
