"""``jaxbased-perplexity``: loss and perplexity of a model on a prepared dataset.

    jaxbased-perplexity --workdir=workdirs/based-360m --data=data/pile-val --seq_len=2048
    jaxbased-perplexity --checkpoint=based-360m/ --data=data/pile-val --max_tokens=1000000

The model comes from a ``train.py`` / ``jaxbased-convert`` / ``jaxbased-quantize`` workdir or a
released checkpoint folder; the data from ``jaxbased-prepare-data`` (tokenized with the model's
tokenizer: GPT-2 for the released models). Windows are those of
:mod:`jaxbased.evaluation.perplexity`. The result is printed as one JSON line (and written to
``--output`` when given).
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import flags, logging

from jaxbased.cli import command, errors

_WORKDIR = flags.DEFINE_string("workdir", None, "train.py or jaxbased-convert workdir")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "released checkpoint folder")
_STEP = flags.DEFINE_integer("step", None, "workdir checkpoint step (default: the latest)")
_DATA = flags.DEFINE_string("data", None, "prepared dataset directory", required=True)
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation"], "dataset split")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "tokens predicted per window")
_BATCH = flags.DEFINE_integer("batch_size", 8, "windows per forward pass")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "evaluate only the split's first tokens")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "override the activation dtype")
_OUTPUT = flags.DEFINE_string("output", None, "also write the result as JSON here")


def check_flags() -> None:
    """Usage errors for flags that cannot work, before the model is loaded."""
    errors.check_model_source(_WORKDIR.value, _CHECKPOINT.value)
    if not (pathlib.Path(_DATA.value) / "metadata.json").is_file():
        raise errors.UsageError(
            f"--data={_DATA.value} is not a prepared dataset (no metadata.json; make one with "
            "jaxbased-prepare-data)"
        )
    for name, value in (("seq_len", _SEQ_LEN.value), ("batch_size", _BATCH.value)):
        if value < 1:
            raise errors.UsageError(f"--{name}={value} must be >= 1")
    if _MAX_TOKENS.value is not None and _MAX_TOKENS.value < 1:
        raise errors.UsageError(f"--max_tokens={_MAX_TOKENS.value} must be >= 1")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    from jaxbased.data.token_store import TokenDataset
    from jaxbased.evaluation import evaluate_perplexity, load_inference_model

    overrides = {} if _DTYPE.value is None else {"dtype": _DTYPE.value}
    try:
        model, params, _ = load_inference_model(
            workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value, step=_STEP.value, **overrides
        )
    except ValueError as error:
        raise errors.UsageError(str(error)) from error
    dataset = TokenDataset.open(_DATA.value)
    start = time.perf_counter()
    result = evaluate_perplexity(
        model,
        params,
        dataset,
        split=_SPLIT.value,
        seq_len=_SEQ_LEN.value,
        batch_size=_BATCH.value,
        max_tokens=_MAX_TOKENS.value,
    )
    seconds = time.perf_counter() - start
    logging.info(
        "%s tokens in %.1f s: loss %.4f, perplexity %.3f",
        f"{result.tokens:,}",
        seconds,
        result.loss,
        result.perplexity,
    )
    line = json.dumps({**result.to_dict(), "data": _DATA.value, "split": _SPLIT.value})
    print(line)
    if _OUTPUT.value:
        pathlib.Path(_OUTPUT.value).write_text(line + "\n")


COMMAND = command.Command(
    name="jaxbased-perplexity",
    summary="loss and perplexity of a model on a dataset made by jaxbased-prepare-data",
    usage="jaxbased-perplexity (--workdir=DIR | --checkpoint=FOLDER) --data=DIR [flags]",
    examples=(
        "jaxbased-perplexity --workdir=workdirs/demo --data=workdirs/demo/builtin_data "
        "--seq_len=256 --max_tokens=20000",
        "jaxbased-perplexity --checkpoint=based-360m/ --data=data/pile-val --seq_len=2048",
    ),
    notes="The data must be tokenized with the model's tokenizer (GPT-2 for the released "
    "models). The result is one JSON line on stdout (and in --output when given).",
    groups=(
        ("model", ("workdir", "checkpoint", "step", "dtype")),
        ("data", ("data", "split", "seq_len", "batch_size", "max_tokens")),
        ("output", ("output",)),
    ),
    required=("data",),
)


def run() -> None:
    """Console-script entry point."""
    command.run(main, COMMAND)


if __name__ == "__main__":
    run()
