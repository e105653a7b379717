"""``jaxbased-attention-similarity``: how alike a model's attention maps are, layer by layer, and
which layers EchoAtt should share (docs/echoatt.md#choosing-the-layers).

    jaxbased-attention-similarity --workdir=workdirs/demo_transformer \\
        --data=workdirs/demo_transformer/builtin_data --seq_len=256 --num_sequences=32

Runs the model over ``--num_sequences`` windows of ``--seq_len`` tokens (consecutive, from the
start of the split), averages the cosine similarity between every pair of full-attention layers'
probability maps over the sequences and heads, draws the heat map (``--figure``, PNG), and
proposes the layers to share by the largest-gap rule. The result is a JSON file (``--output``)
and one JSON line on stdout.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import flags, logging

from jaxbased.cli import command, errors

_WORKDIR = flags.DEFINE_string("workdir", None, "train.py workdir of the model", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_DATA = flags.DEFINE_string("data", None, "prepared dataset directory", required=True)
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation"], "dataset split")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "tokens per sequence")
_NUM_SEQUENCES = flags.DEFINE_integer("num_sequences", 32, "sequences to average over")
_BATCH = flags.DEFINE_integer("batch_size", 4, "sequences per forward pass")
_OUTPUT = flags.DEFINE_string(
    "output", None, "JSON result (default: WORKDIR/attention_similarity.json)"
)
_FIGURE = flags.DEFINE_string("figure", None, "heat map PNG (default: the --output path with .png)")


def check_flags() -> None:
    """Usage errors for flags that cannot work, before the model is loaded."""
    if not (pathlib.Path(_DATA.value) / "metadata.json").is_file():
        raise errors.UsageError(
            f"--data={_DATA.value} is not a prepared dataset (no metadata.json; make one with "
            "jaxbased-prepare-data)"
        )
    for name, value in (
        ("seq_len", _SEQ_LEN.value),
        ("num_sequences", _NUM_SEQUENCES.value),
        ("batch_size", _BATCH.value),
    ):
        if value < 1:
            raise errors.UsageError(f"--{name}={value} must be >= 1")


def sequence_batches(
    tokens: np.ndarray, seq_len: int, num_sequences: int, batch_size: int
) -> list[np.ndarray]:
    """Consecutive windows ``tokens[i * seq_len : (i + 1) * seq_len]``, at most
    ``num_sequences`` of them, in batches of ``batch_size`` rows (the last may be smaller)."""
    available = len(tokens) // seq_len
    count = min(num_sequences, available)
    if count == 0:
        raise errors.UsageError(
            f"the split has {len(tokens)} tokens, fewer than one --seq_len={seq_len} sequence"
        )
    windows = np.asarray(tokens[: count * seq_len], np.int32).reshape(count, seq_len)
    return [windows[start : start + batch_size] for start in range(0, count, batch_size)]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    from jaxbased import echoatt
    from jaxbased.data.token_store import TokenDataset
    from jaxbased.evaluation import load_model
    from jaxbased.model import LanguageModel

    try:
        config, params, _ = load_model(workdir=_WORKDIR.value, step=_STEP.value)
    except ValueError as error:
        raise errors.UsageError(str(error)) from error
    config, params = echoatt.unrolled(config, params)
    if len(config.attention_map_layers) < 2:
        raise errors.UsageError(
            f"--workdir={_WORKDIR.value}: the model has {len(config.attention_map_layers)} "
            "full-attention layers; the similarity needs at least 2"
        )
    dataset = TokenDataset.open(_DATA.value)
    batches = sequence_batches(
        np.asarray(dataset.tokens(_SPLIT.value)),
        _SEQ_LEN.value,
        _NUM_SEQUENCES.value,
        _BATCH.value,
    )
    sequences = sum(len(batch) for batch in batches)
    similarity = echoatt.attention_similarity(LanguageModel(config), params, batches)
    report = echoatt.similarity_report(config, similarity, sequences, _SEQ_LEN.value)
    output = pathlib.Path(
        _OUTPUT.value or pathlib.Path(_WORKDIR.value) / "attention_similarity.json"
    )
    figure = pathlib.Path(_FIGURE.value or output.with_suffix(".png"))
    echoatt.plot_similarity(
        report.similarity,
        report.layers,
        figure,
        title=f"attention-map cosine similarity ({sequences} x {_SEQ_LEN.value} tokens)",
    )
    result = {**report.to_dict(), "workdir": _WORKDIR.value, "data": _DATA.value}
    result["figure"] = str(figure)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    logging.info(
        "layers %s: mean similarity %s; largest gap at %.3f keeps %s, proposes sharing %s",
        list(report.layers),
        np.round(report.mean_similarity, 3).tolist(),
        report.threshold,
        list(report.kept),
        [list(pair) for pair in report.attention_sharing],
    )
    print(json.dumps({key: result[key] for key in ("kept", "proposed", "attention_sharing")}))


COMMAND = command.Command(
    name="jaxbased-attention-similarity",
    summary="per-layer attention-map cosine similarity on a dataset, its heat map, and the "
    "layers EchoAtt should share (largest-gap rule)",
    usage="jaxbased-attention-similarity --workdir=DIR --data=DIR [flags]",
    examples=(
        "jaxbased-attention-similarity --workdir=workdirs/demo_transformer "
        "--data=workdirs/demo_transformer/builtin_data --seq_len=256 --num_sequences=32",
    ),
    notes="Only full-attention layers have attention maps. The JSON holds the similarity "
    "matrix, each layer's mean similarity to the others, the cut and the proposed "
    "attention_sharing (docs/echoatt.md).",
    groups=(
        ("model", ("workdir", "step")),
        ("data", ("data", "split", "seq_len", "num_sequences", "batch_size")),
        ("output", ("output", "figure")),
    ),
    required=("workdir", "data"),
)


def run() -> None:
    """Console-script entry point."""
    command.run(main, COMMAND)


if __name__ == "__main__":
    run()
