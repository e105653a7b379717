"""``jaxbased-generate``: continue a prompt with a model trained by ``train.py``, streaming text.

    jaxbased-generate --workdir=workdirs/demo --prompt="Once upon a time"
    jaxbased-generate --workdir=workdirs/demo --prompt_file=prompt.txt --max_new_tokens=500
    echo "Once upon a time" | jaxbased-generate --workdir=workdirs/demo --temperature=0
    jaxbased-generate --workdir=workdirs/demo --num_samples=4 Once upon a time
    jaxbased-generate --workdir=workdirs/demo --recycled_top_k=256 --recycled_stride=10 Once

The prompt comes from ``--prompt``, the words after the flags, ``--prompt_file`` (``-`` is
stdin), or stdin when it is not a terminal. The model config, parameters and tokenizer are read
from the workdir's latest complete checkpoint (or ``--step``), or from a quantized workdir of
``jaxbased-quantize`` (docs/quantization.md). With one sample the text is
printed as it is produced (from inside the compiled decode loop); several samples are decoded as
one batch and printed at the end. Speeds go to stderr: the prefill (compilation included on this
first call) and the decode rate in tokens per second, timed from the first to the last streamed
token so that it excludes compilation.

``--recycled_top_k=K`` (> 0) decodes the full-attention layers under Recycled Attention
(docs/recycled_attention.md): most steps attend only the ``K`` keys per head that the last full
step attended to most; ``--recycled_stride``, ``--recycled_similarity_threshold``,
``--recycled_check_every``, ``--recycled_head_selection`` and ``--recycled_pool_size`` are the
policy's other fields.
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
from absl import flags, logging

from jaxbased.cli import command, errors, recycled_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "train.py run directory", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest intact one)")
_PROMPT = flags.DEFINE_string("prompt", None, "prompt text")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "file holding the prompt; - for stdin")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate per sample")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 is greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass in (0, 1] (1: off)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "continuations of the prompt (one batch)")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "end a sample at the end-of-text token")
_ECHO_PROMPT = flags.DEFINE_bool("echo_prompt", True, "print the prompt before the continuation")
_RECYCLED_TOP_K = flags.DEFINE_integer(
    "recycled_top_k", 0, "Recycled Attention: keys per head on a recycled step (0: off)"
)
_RECYCLED_STRIDE = flags.DEFINE_integer(
    "recycled_stride", 10, "Recycled Attention: a full-attention step every this many tokens"
)
_RECYCLED_THRESHOLD = flags.DEFINE_float(
    "recycled_similarity_threshold",
    None,
    "Recycled Attention: also a full step when the query's cosine similarity to the last full "
    "step's query falls below this, in [-1, 1] (default: off)",
)
_RECYCLED_CHECK_EVERY = flags.DEFINE_integer(
    "recycled_check_every", 5, "Recycled Attention: steps between two similarity checks"
)
_RECYCLED_HEAD_SELECTION = flags.DEFINE_string(
    "recycled_head_selection",
    "group_max",
    "Recycled Attention: how the kept keys are chosen: group_max, first_head or recent",
)
_RECYCLED_POOL_SIZE = flags.DEFINE_integer(
    "recycled_pool_size", 5, "Recycled Attention: group_max's max-pool width in positions (odd)"
)


class StepTimer:
    """A generate() callback that times the decode loop from its first to its last step.

    The first step's tokens come from the prefill, so the rate counts the tokens after it:
    compilation and prefill are excluded.
    """

    def __init__(self) -> None:
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.tokens_after_first = 0

    def __call__(self, step: int, tokens: np.ndarray) -> None:
        now = time.perf_counter()
        if self.first_time is None:
            self.first_time = now
        else:
            self.tokens_after_first += int((tokens >= 0).sum())
        self.last_time = now

    def decode_rate(self) -> float | None:
        """Tokens per second between the first and the last step (None if under two steps)."""
        if not self.tokens_after_first or self.last_time == self.first_time:
            return None
        return self.tokens_after_first / (self.last_time - self.first_time)


class TextStream(StepTimer):
    """Turns row 0's streamed token ids into text printed as soon as it is complete.

    Decodes all ids so far and prints the part not yet printed, holding back a trailing U+FFFD
    (a multi-byte character whose bytes have not all arrived).
    """

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        super().__init__()
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, step: int, tokens: np.ndarray) -> None:
        super().__call__(step, tokens)
        token = int(tokens[0])
        if token < 0:  # the row has stopped
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[len(self.printed) :] + "\n")
        self.out.flush()


def read_prompt(words: list[str]) -> str:
    """The prompt from ``--prompt``, the positional words, ``--prompt_file`` or stdin."""
    sources = [
        name
        for name, given in (
            ("--prompt", _PROMPT.value is not None),
            ("words after the flags", bool(words)),
            ("--prompt_file", _PROMPT_FILE.value is not None),
        )
        if given
    ]
    if len(sources) > 1:
        raise errors.UsageError(f"give the prompt one way only; got {' and '.join(sources)}")
    if _PROMPT.value is not None:
        prompt = _PROMPT.value
    elif words:
        prompt = " ".join(words)
    elif _PROMPT_FILE.value == "-" or (_PROMPT_FILE.value is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    elif _PROMPT_FILE.value is not None:
        if not pathlib.Path(_PROMPT_FILE.value).is_file():
            raise errors.UsageError(f"--prompt_file={_PROMPT_FILE.value}: no such file")
        with open(_PROMPT_FILE.value, encoding="utf-8") as file:
            prompt = file.read()
    else:
        raise errors.UsageError(
            "give a prompt: --prompt, words after the flags, --prompt_file or stdin"
        )
    if not prompt:
        raise errors.UsageError("the prompt is empty")
    return prompt


def check_workdir(workdir: str) -> None:
    """A usage error unless ``workdir`` is a folder with a ``checkpoints/`` folder, or a
    quantized workdir of ``jaxbased-quantize`` (nothing is created when it is not)."""
    from jaxbased.quantization.workdir import is_quantized_workdir
    from jaxbased.training.checkpointing import CHECKPOINT_SUBDIR

    path = pathlib.Path(workdir)
    if not path.is_dir():
        raise errors.UsageError(f"--workdir={workdir} does not exist")
    if is_quantized_workdir(path):
        if _STEP.value is not None:
            raise errors.UsageError(
                f"--workdir={workdir} is a quantized workdir (one model, no steps): drop --step"
            )
        return
    if not (path / CHECKPOINT_SUBDIR).is_dir():
        raise errors.UsageError(
            f"--workdir={workdir} holds no {CHECKPOINT_SUBDIR}/ folder: not a train.py or "
            "jaxbased-convert workdir"
        )


def check_sampling_flags() -> None:
    """A usage error naming the first sampling flag out of its range."""
    checks = (
        ("max_new_tokens", _MAX_NEW.value, _MAX_NEW.value >= 1, ">= 1"),
        ("num_samples", _NUM_SAMPLES.value, _NUM_SAMPLES.value >= 1, ">= 1"),
        ("temperature", _TEMPERATURE.value, _TEMPERATURE.value >= 0, ">= 0 (0 is greedy)"),
        ("top_k", _TOP_K.value, _TOP_K.value >= 0, ">= 0 (0: all tokens)"),
        ("top_p", _TOP_P.value, 0 < _TOP_P.value <= 1, "in (0, 1]"),
    )
    for name, value, valid, allowed in checks:
        if not valid:
            raise errors.UsageError(f"--{name}={value} must be {allowed}")


def recycled_attention_policy():
    """The ``RecycledAttentionPolicy`` of the ``--recycled_*`` flags (None when
    ``--recycled_top_k=0``); a usage error naming the flag of a bad value."""
    return recycled_flags.policy_from_flag_values(
        top_k=_RECYCLED_TOP_K.value,
        stride=_RECYCLED_STRIDE.value,
        similarity_threshold=_RECYCLED_THRESHOLD.value,
        check_every=_RECYCLED_CHECK_EVERY.value,
        head_selection=_RECYCLED_HEAD_SELECTION.value,
        pool_size=_RECYCLED_POOL_SIZE.value,
    )


def main(argv: list[str]) -> None:
    check_sampling_flags()
    policy = recycled_attention_policy()
    check_workdir(_WORKDIR.value)
    prompt = read_prompt(argv[1:])

    # Imported here so that --help and usage errors answer without loading JAX and Orbax.
    from jaxbased.generation import generate
    from jaxbased.model import LanguageModel
    from jaxbased.quantization.workdir import is_quantized_workdir, load_quantized_workdir
    from jaxbased.training.checkpointing import load_for_inference

    if is_quantized_workdir(_WORKDIR.value):
        model, params, tokenizer, _ = load_quantized_workdir(_WORKDIR.value)
        config = model.config
    else:
        config, params, tokenizer = load_for_inference(_WORKDIR.value, _STEP.value)
        model = LanguageModel(config)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise errors.UsageError("the prompt encodes to no tokens")
    logging.info(
        "model: %d layers (%s), d_model %d; prompt: %d tokens",
        config.num_layers,
        ", ".join(sorted(set(config.layer_pattern))),
        config.d_model,
        len(prompt_ids),
    )
    streaming = _NUM_SAMPLES.value == 1
    timer = TextStream(tokenizer) if streaming else StepTimer()
    if streaming and _ECHO_PROMPT.value:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    try:
        result = generate(
            model,
            params,
            [prompt_ids] * _NUM_SAMPLES.value,
            max_new_tokens=_MAX_NEW.value,
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            top_p=_TOP_P.value,
            seed=_SEED.value,
            stop_tokens=(tokenizer.eos_id,) if _STOP_AT_EOS.value else (),
            callback=timer,
            recycled_attention=policy,
        )
    except ValueError as error:  # bad sampling arguments: a usage error, not a traceback
        raise errors.UsageError(str(error)) from error
    if isinstance(timer, TextStream):
        timer.finish()
    else:
        for index, tokens in enumerate(result.tokens):
            header = f"--- sample {index} " + "-" * 56
            body = (prompt if _ECHO_PROMPT.value else "") + tokenizer.decode(tokens)
            print(f"{header}\n{body}", flush=True)

    total = result.total_generated
    decode_rate = timer.decode_rate()
    how = "first to last step"
    if decode_rate is None:
        decode_rate = total / result.decode_seconds if result.decode_seconds > 0 else float("nan")
        how = "compilation included"
    print(
        f"[{total} tokens in {result.prefill_seconds + result.decode_seconds:.2f} s; prefill "
        f"{len(prompt_ids)} tokens x {_NUM_SAMPLES.value} in {result.prefill_seconds:.2f} s "
        f"(compilation included); decode {decode_rate:.1f} tokens/s ({how})]",
        file=sys.stderr,
        flush=True,
    )
    if result.full_attention_steps is not None:
        print(
            "[Recycled Attention: full-attention steps per layer while decoding: "
            f"{result.full_attention_steps.tolist()}]",
            file=sys.stderr,
            flush=True,
        )


COMMAND = command.Command(
    name="jaxbased-generate",
    summary="continue a prompt with a model of a train.py (or jaxbased-convert) workdir, "
    "streaming the text as it is produced",
    usage="jaxbased-generate --workdir=DIR [flags] [PROMPT WORDS...]",
    examples=(
        'jaxbased-generate --workdir=workdirs/demo --prompt="Once upon a time"',
        'echo "def main(" | jaxbased-generate --workdir=workdirs/demo --temperature=0',
        "jaxbased-generate --workdir=workdirs/demo --num_samples=4 --max_new_tokens=100 Once upon",
    ),
    notes="The prompt comes from --prompt, the words after the flags, --prompt_file, or stdin "
    "when it is not a terminal. The model, parameters and tokenizer are read from the "
    "workdir's newest intact checkpoint (a damaged newer one is skipped with a warning), or from "
    "a quantized workdir of jaxbased-quantize. "
    "Speeds go to stderr.",
    groups=(
        ("model", ("workdir", "step")),
        ("prompt", ("prompt", "prompt_file", "echo_prompt")),
        (
            "sampling",
            (
                "max_new_tokens",
                "temperature",
                "top_k",
                "top_p",
                "seed",
                "num_samples",
                "stop_at_eos",
            ),
        ),
        (
            "recycled attention",
            (
                "recycled_top_k",
                "recycled_stride",
                "recycled_similarity_threshold",
                "recycled_check_every",
                "recycled_head_selection",
                "recycled_pool_size",
            ),
        ),
    ),
    required=("workdir",),
)


def run() -> None:
    """Console-script entry point."""
    command.run(main, COMMAND)


if __name__ == "__main__":
    run()
