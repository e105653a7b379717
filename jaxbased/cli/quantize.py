"""``jaxbased-quantize``: static 8-bit quantization of a Mamba / Mamba-2 model (Quamba), as a
quantized workdir that ``jaxbased-generate`` runs (docs/quantization.md).

    jaxbased-quantize --workdir=workdirs/mamba --calibration_data=data/pile \\
        --output_workdir=workdirs/mamba-int8
    jaxbased-quantize --checkpoint=mamba-360m/ --calibration_data=data/pile \\
        --output_workdir=workdirs/mamba-360m-int8 --num_sequences=512 --seq_len=512
    jaxbased-generate --workdir=workdirs/mamba-int8 --prompt="Once upon a time"

The model comes from a ``train.py`` / ``jaxbased-convert`` workdir or a mamba_ssm checkpoint
folder; the calibration sequences are the first ``--num_sequences`` windows of ``--seq_len``
tokens of a split of a dataset made by ``jaxbased-prepare-data`` (tokenized with the model's
tokenizer). The scales are printed as one JSON line of summary and stored in the output.
"""

from __future__ import annotations

import json
import pathlib

from absl import flags, logging

from jaxbased.cli import command, errors

_WORKDIR = flags.DEFINE_string("workdir", None, "train.py or jaxbased-convert workdir")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "released (mamba_ssm) checkpoint folder")
_STEP = flags.DEFINE_integer("step", None, "workdir checkpoint step (default: the latest)")
_TOKENIZER_FILE = flags.DEFINE_string(
    "tokenizer_file",
    None,
    "--checkpoint: a gpt2.tiktoken or tokenizer.json (default: one in the checkpoint folder)",
)
_CALIBRATION_DATA = flags.DEFINE_string(
    "calibration_data", None, "prepared dataset directory (jaxbased-prepare-data)", required=True
)
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "validation"], "calibration split")
_NUM_SEQUENCES = flags.DEFINE_integer("num_sequences", 512, "calibration sequences")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "tokens per calibration sequence")
_BATCH = flags.DEFINE_integer("batch_size", 1, "sequences per calibration batch")
_OUTPUT = flags.DEFINE_string("output_workdir", None, "quantized workdir to write", required=True)
_ARITHMETIC = flags.DEFINE_enum(
    "arithmetic", "int8", ["int8", "fake"], "int8 matmuls, or quantize-dequantize in float"
)
_HADAMARD = flags.DEFINE_bool("hadamard", True, "fold a Hadamard rotation into out_proj")
_SSM_INPUT_OBSERVER = flags.DEFINE_enum(
    "ssm_input_observer", "percentile", ["percentile", "min_max"], "the SSM input's scale"
)
_PERCENTILE = flags.DEFINE_float("percentile", 0.99999, "quantile of |u| per batch")
_MOMENTUM = flags.DEFINE_float("momentum", 0.01, "EMA rate of the percentile observer")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing --output_workdir")


def check_flags() -> None:
    """Usage errors for flags that cannot work, before the model is loaded."""
    errors.check_model_source(_WORKDIR.value, _CHECKPOINT.value)
    if _WORKDIR.value is not None and (pathlib.Path(_WORKDIR.value) / "quantized").is_dir():
        raise errors.UsageError(
            f"--workdir={_WORKDIR.value} is already quantized: give the float model's workdir"
        )
    if not (pathlib.Path(_CALIBRATION_DATA.value) / "metadata.json").is_file():
        raise errors.UsageError(
            f"--calibration_data={_CALIBRATION_DATA.value} is not a prepared dataset (no "
            "metadata.json; make one with jaxbased-prepare-data)"
        )
    for name, value in (
        ("num_sequences", _NUM_SEQUENCES.value),
        ("seq_len", _SEQ_LEN.value),
        ("batch_size", _BATCH.value),
    ):
        if value < 1:
            raise errors.UsageError(f"--{name}={value} must be >= 1")
    if not 0 < _PERCENTILE.value <= 1:
        raise errors.UsageError(f"--percentile={_PERCENTILE.value} must be in (0, 1]")
    if not 0 < _MOMENTUM.value <= 1:
        raise errors.UsageError(f"--momentum={_MOMENTUM.value} must be in (0, 1]")
    output = pathlib.Path(_OUTPUT.value)
    if output.exists() and not _OVERWRITE.value:
        raise errors.UsageError(f"--output_workdir={output} exists (--overwrite replaces it)")
    for source in (_WORKDIR.value, _CHECKPOINT.value):
        if source is not None and pathlib.Path(source).resolve() == output.resolve():
            raise errors.UsageError("--output_workdir must differ from the model's folder")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    # Imported here so that --help and usage errors answer without loading JAX.
    from jaxbased.data.token_store import TokenDataset
    from jaxbased.evaluation import load_model
    from jaxbased.quantization.calibration import (
        QuantizationSettings,
        calibration_windows,
        quantize_model,
    )
    from jaxbased.quantization.mamba import check_quantizable, parameter_bytes
    from jaxbased.quantization.workdir import save_quantized_workdir

    settings = QuantizationSettings(
        arithmetic=_ARITHMETIC.value,
        hadamard=_HADAMARD.value,
        ssm_input_observer=_SSM_INPUT_OBSERVER.value,
        percentile=_PERCENTILE.value,
        momentum=_MOMENTUM.value,
    )
    try:
        config, params, tokenizer = load_model(
            workdir=_WORKDIR.value,
            checkpoint=_CHECKPOINT.value,
            step=_STEP.value,
            tokenizer_file=_TOKENIZER_FILE.value,
        )
        check_quantizable(config, settings.hadamard)
        dataset = TokenDataset.open(_CALIBRATION_DATA.value)
        if dataset.vocab_size > config.padded_vocab_size:
            raise ValueError(
                f"--calibration_data has {dataset.vocab_size} token ids; the model embeds "
                f"{config.padded_vocab_size}: tokenize it with the model's tokenizer"
            )
        sequences = calibration_windows(
            dataset.tokens(_SPLIT.value), _NUM_SEQUENCES.value, _SEQ_LEN.value
        )
    except ValueError as error:
        raise errors.UsageError(str(error)) from error
    if sequences.shape[0] < _NUM_SEQUENCES.value:
        logging.warning(
            "the %s split holds %d windows of %d tokens (asked for %d): calibrating on those",
            _SPLIT.value,
            sequences.shape[0],
            _SEQ_LEN.value,
            _NUM_SEQUENCES.value,
        )
    model, quantized, calibration = quantize_model(
        config, params, sequences, settings, batch_size=_BATCH.value
    )
    source = {
        "workdir": _WORKDIR.value,
        "checkpoint": _CHECKPOINT.value,
        "step": _STEP.value,
        "calibration_data": _CALIBRATION_DATA.value,
        "split": _SPLIT.value,
        "seq_len": _SEQ_LEN.value,
        "batch_size": _BATCH.value,
    }
    output = save_quantized_workdir(
        _OUTPUT.value,
        config,
        quantized,
        settings,
        tokenizer,
        calibration,
        source,
        overwrite=_OVERWRITE.value,
    )
    summary = {
        "output_workdir": str(output),
        "layers": model.config.num_layers,
        "calibration_sequences": calibration.num_sequences,
        "seq_len": int(sequences.shape[1]),
        "float_parameter_bytes": parameter_bytes(params).total,
        "quantized_parameter_bytes": parameter_bytes(quantized).total,
        **settings.to_dict(),
    }
    print(json.dumps(summary))


COMMAND = command.Command(
    name="jaxbased-quantize",
    summary="static 8-bit quantization of a Mamba model (Quamba): calibrate on a dataset, "
    "write a quantized workdir that jaxbased-generate runs",
    usage="jaxbased-quantize (--workdir=DIR | --checkpoint=FOLDER) --calibration_data=DIR "
    "--output_workdir=DIR [flags]",
    examples=(
        "jaxbased-quantize --workdir=workdirs/mamba --calibration_data=workdirs/mamba/"
        "builtin_data --output_workdir=workdirs/mamba-int8 --num_sequences=64 --seq_len=256",
        "jaxbased-generate --workdir=workdirs/mamba-int8 --prompt='Once upon a time'",
    ),
    notes="Only models whose every layer is a Mamba (mamba) or Mamba-2 (mamba2) mixer are "
    "quantized; any other family is refused. Weights of in_proj, conv, x_proj, dt_proj and "
    "out_proj become int8 "
    "(per-tensor scales), activations get static per-tensor scales from calibration; the "
    "embedding, head, norms and the scan's state stay float32.",
    groups=(
        ("model", ("workdir", "checkpoint", "step", "tokenizer_file")),
        ("calibration", ("calibration_data", "split", "num_sequences", "seq_len", "batch_size")),
        (
            "quantization",
            ("arithmetic", "hadamard", "ssm_input_observer", "percentile", "momentum"),
        ),
        ("output", ("output_workdir", "overwrite")),
    ),
    required=("calibration_data", "output_workdir"),
)


def run() -> None:
    """Console-script entry point."""
    command.run(main, COMMAND)


if __name__ == "__main__":
    run()
