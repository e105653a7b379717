"""Quamba ablation: what calibration, the percentile observer and the Hadamard rotation each do to
an int8 Mamba's eval loss, and what int8 does to decode speed and bytes (docs/quantization.md).

Main rows (all static per-tensor W8A8 with the int8 arithmetic, one calibration per rotation
setting on the first ``--num_sequences`` windows of ``--seq_len`` tokens of
``--calibration_split``):

- ``fp32``: the float model;
- ``W8A8``: min-max scales everywhere, no rotation (naive);
- ``+percentile``: the SSM input's scale from the percentile-EMA observer;
- ``+Hadamard``: the rotation folded into ``out_proj``, min-max everywhere;
- ``+both``: Quamba (percentile and rotation);
- ``+both (fake)``: the same model in the fake-quant arithmetic (its loss should equal the
  row above to float rounding).

Eval loss is the mean next-token loss over the first ``--eval_tokens`` tokens of
``--eval_split`` in windows of ``--eval_seq_len`` (the windows of
:mod:`jaxbased.evaluation.perplexity`). Every variant is scored on the same windows, so a
difference between two rows is paired: its standard error is that of the per-window loss
differences (a ratio estimate over the windows), printed as ``± SE``.

Investigation rows (each can be turned off):

- ``--sensitivity``: with and without the rotation, the loss when only one activation point is
  rounded (``QuantizedLanguageModel(rounded_points=(point,))``; all weights int8), and with
  none rounded (weights only): where the W8A8 loss comes from;
- ``--calibration_sizes``: the rotated model calibrated on the first N windows for each N
  (both SSM-input observers), and once on ``--num_sequences`` windows of uniformly random token
  ids (scales from data unlike the eval data);
- ``--percentiles``: the rotated model with the SSM input's percentile observer at each
  quantile (same momentum);
- per layer, the calibrated ranges (``127 ·`` scale): the SSM input's min-max and percentile
  range, ``out_proj``'s input range without and with the rotation.

Decode: greedy ``jaxbased.generate`` of ``--decode_steps`` tokens after a ``--prompt_len``
prompt at batch 1, fp32 and int8 (``+both``) compiled first, then timed alternately
``--repeats`` times each, so both see the same machine load; ms/token = decode seconds /
generated tokens (best and median). Bytes: the parameters (by dtype) and the decode cache of
one sequence.

Usage (from the repository root)::

    python benchmarks/quamba_ablation.py --workdir=workdirs/mamba --data=workdirs/mamba/data
    python benchmarks/quamba_ablation.py --quick    # random tiny Mamba, seconds

The JSON (machine, date, settings, rows) goes to ``--output`` and the markdown tables to
stdout and ``--markdown`` (both written atomically).
"""

from __future__ import annotations

import datetime
import functools
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import machine_info, write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Mamba train.py / jaxbased-convert workdir")
flags.DEFINE_string("checkpoint", None, "or a mamba_ssm checkpoint folder")
flags.DEFINE_string("data", None, "prepared dataset (jaxbased-prepare-data), model's tokenizer")
flags.DEFINE_string("calibration_split", "train", "split the calibration windows come from")
flags.DEFINE_string("eval_split", "validation", "split the eval loss is measured on")
flags.DEFINE_integer("num_sequences", 128, "calibration windows")
flags.DEFINE_integer("seq_len", 512, "tokens per calibration window")
flags.DEFINE_integer("eval_tokens", 200_000, "eval tokens")
flags.DEFINE_integer("eval_seq_len", 512, "eval window")
flags.DEFINE_integer("eval_batch_size", 8, "eval windows per forward")
flags.DEFINE_integer("prompt_len", 64, "decode: prompt tokens")
flags.DEFINE_integer("decode_steps", 256, "decode: generated tokens")
flags.DEFINE_integer("repeats", 7, "decode: timed runs of each model (alternating)")
flags.DEFINE_bool("sensitivity", True, "rows with one activation point rounded at a time")
flags.DEFINE_list("calibration_sizes", ["1", "4", "16", "512"], "calibration windows to sweep")
flags.DEFINE_list("percentiles", ["0.999", "0.9999"], "SSM-input percentiles to sweep")
flags.DEFINE_bool("quick", False, "random tiny Mamba and a small built-in dataset (a smoke run)")
flags.DEFINE_string("output", "benchmarks/results/quamba_ablation.json", "JSON ('' for none)")
flags.DEFINE_string("markdown", "benchmarks/results/quamba_ablation.md", "tables ('' for none)")

#: (row, hadamard, SSM-input observer, arithmetic); None: the float model.
VARIANTS: tuple[tuple[str, bool | None, str | None, str | None], ...] = (
    ("fp32", None, None, None),
    ("W8A8", False, "min_max", "int8"),
    ("+percentile", False, "percentile", "int8"),
    ("+Hadamard", True, "min_max", "int8"),
    ("+both", True, "percentile", "int8"),
    ("+both (fake)", True, "percentile", "fake"),
)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def quick_inputs(folder: pathlib.Path) -> tuple[Any, Any, Any]:
    """A random tiny Mamba (d 64, 2 layers, byte vocabulary) and a dataset of the built-in
    corpus's first 200 kB."""
    import flax.linen as nn

    from jaxbased import LanguageModel, ModelConfig
    from jaxbased.data.corpus import Document, builtin_corpus_files
    from jaxbased.data.token_store import TokenDataset, write_token_dataset
    from jaxbased.data.tokenizers import ByteTokenizer

    config = ModelConfig.from_preset(
        "mamba_tiny", vocab_size=257, num_layers=2, layer_pattern=("mamba",) * 2, init_std=0.1
    )
    params = LanguageModel(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    documents = [
        Document(str(path), path.read_text(errors="replace"))
        for path in builtin_corpus_files(200_000)
    ]
    path = write_token_dataset(documents, ByteTokenizer(), folder / "data", progress=False)
    return config, nn.meta.unbox(params["params"]), TokenDataset.open(path)


# Eval loss per window ---------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _row_nll(model, params, windows, lengths):
    """Per row, the summed ``-log p`` (float32 ``[B]``) of ``windows[b, 1:lengths[b]]``."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = model.apply({"params": params}, inputs).astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    chosen = chosen - jax.nn.logsumexp(logits, axis=-1)
    valid = jnp.arange(targets.shape[1])[None, :] < (lengths[:, None] - 1)
    return -jnp.sum(jnp.where(valid, chosen, 0.0), axis=1)


def window_losses(model, params, tokens, seq_len: int, batch_size: int):
    """``(nll [W], counts [W])`` (float64, int64): the summed loss and the predicted tokens of
    each window of ``seq_len + 1`` tokens starting every ``seq_len`` tokens of ``tokens [N]``
    (the windows of :func:`jaxbased.evaluation.perplexity.perplexity_of_tokens`)."""
    import numpy as np

    tokens = np.asarray(tokens, np.int64)
    starts = list(range(0, tokens.size - 1, seq_len))
    params = jax.tree.map(jnp.asarray, params)
    losses, counts = [], []
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        windows = np.zeros((batch_size, seq_len + 1), np.int32)
        lengths = np.zeros((batch_size,), np.int32)
        for row, start in enumerate(chunk):
            piece = tokens[start : start + seq_len + 1]
            windows[row, : piece.size] = piece
            lengths[row] = piece.size
        found = np.asarray(_row_nll(model, params, jnp.asarray(windows), jnp.asarray(lengths)))
        losses.extend(found[: len(chunk)].astype(np.float64))
        counts.extend(lengths[: len(chunk)] - 1)
    return np.asarray(losses), np.asarray(counts, np.int64)


def paired_difference(nll, reference_nll, counts) -> tuple[float, float]:
    """``(mean loss difference, its standard error)`` of two models scored on the same windows:
    ``d = Σ (nll - ref) / Σ counts``, the standard error of that ratio over the windows."""
    import numpy as np

    differences = np.asarray(nll) - np.asarray(reference_nll)
    total = float(np.sum(counts))
    mean = float(np.sum(differences)) / total
    windows = differences.size
    if windows < 2:
        return mean, float("nan")
    residuals = differences - mean * np.asarray(counts)
    return mean, float(np.sqrt(windows / (windows - 1) * np.sum(residuals**2)) / total)


# Decode -----------------------------------------------------------------------------------
def decode_timings(
    models: dict[str, tuple[Any, Any]], prompt: list[int], steps: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Per model, ms per generated token of greedy ``generate`` (each compiled by one call
    first; then the models timed in turn, ``repeats`` rounds)."""
    from jaxbased.generation import generate

    def once(model, params) -> float:
        result = generate(
            model, params, [prompt], max_new_tokens=steps, temperature=0.0, stop_tokens=()
        )
        return 1000 * result.decode_seconds / max(result.total_generated, 1)

    for model, params in models.values():
        once(model, params)
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, (model, params) in models.items():
            runs[name].append(once(model, params))
    return {
        name: {"best": min(times), "median": statistics.median(times), "runs": times}
        for name, times in runs.items()
    }


# The measurements ---------------------------------------------------------------------------
class Ablation:
    """The float model, its calibrations and the eval windows; each method scores a variant."""

    def __init__(self, config, params, dataset, settings: dict[str, Any]):
        import numpy as np

        from jaxbased.quantization.calibration import calibration_windows

        self.config, self.params, self.settings = config, params, settings
        self.sequences = calibration_windows(
            dataset.tokens(settings["calibration_split"]),
            max(settings["num_sequences"], *settings["calibration_sizes"]),
            settings["seq_len"],
        )
        settings["calibration_windows"] = min(settings["num_sequences"], len(self.sequences))
        start, end = dataset.split_bounds(settings["eval_split"])
        eval_tokens = dataset.tokens(settings["eval_split"])[
            : min(end - start, settings["eval_tokens"])
        ]
        if not isinstance(eval_tokens, np.ndarray):
            eval_tokens = eval_tokens.read().result()
        self.eval_tokens = np.asarray(eval_tokens)
        self.folded: dict[bool, Any] = {}
        self.calibrations: dict[tuple, Any] = {}
        self.reference = None  # fp32 per-window losses

    def calibration(self, hadamard: bool, count: int | None = None, **observer: Any):
        """The calibration of the (rotated if ``hadamard``) float model on the first ``count``
        windows (default ``num_sequences``); ``observer``: percentile / momentum / random."""
        from jaxbased.quantization.calibration import calibrate
        from jaxbased.quantization.mamba import fold_hadamard

        count = self.settings["calibration_windows"] if count is None else count
        key = (hadamard, count, tuple(sorted(observer.items())))
        if key not in self.calibrations:
            if hadamard not in self.folded:
                self.folded[hadamard] = fold_hadamard(self.config, self.params, hadamard)
            sequences = self.sequences[:count]
            if observer.pop("random", False):
                import numpy as np

                sequences = np.random.default_rng(0).integers(
                    0, self.config.vocab_size, size=sequences.shape, dtype=np.int32
                )
            self.calibrations[key] = calibrate(
                self.config, self.folded[hadamard], sequences, hadamard=hadamard, **observer
            )
        return self.calibrations[key]

    def quantized(self, hadamard, observer, arithmetic="int8", calibration=None, points=None):
        """``(model, params)`` of the int8 model with the SSM input's ``observer`` scale."""
        from jaxbased.quantization.mamba import (
            QuantizedLanguageModel,
            quantize_parameters,
            unrolled_config,
        )

        calibration = calibration or self.calibration(hadamard)
        model = QuantizedLanguageModel(
            unrolled_config(self.config),
            arithmetic=arithmetic,
            hadamard=hadamard,
            rounded_points=points,
        )
        params = quantize_parameters(
            self.config, self.folded[hadamard], calibration.activation_scales(observer)
        )
        return model, params

    def score(self, model, params, **row: Any) -> dict[str, Any]:
        """``row`` with the eval loss of ``(model, params)`` and its paired difference to fp32
        (the first model scored is fp32 itself)."""
        began = time.perf_counter()
        nll, counts = window_losses(
            model,
            params,
            self.eval_tokens,
            self.settings["eval_seq_len"],
            self.settings["eval_batch_size"],
        )
        if self.reference is None:
            self.reference = nll
        difference, error = paired_difference(nll, self.reference, counts)
        row.update(
            eval_loss=float(nll.sum() / counts.sum()),
            eval_tokens=int(counts.sum()),
            eval_windows=int(counts.size),
            vs_fp32=difference,
            vs_fp32_standard_error=error,
            window_nll=nll.tolist(),
            seconds=time.perf_counter() - began,
        )
        print(f"{row.get('variant')}: loss {row['eval_loss']:.5f} ({row['seconds']:.1f} s)")
        return row


def run(config, params, dataset, settings: dict[str, Any]) -> dict[str, Any]:

    from jaxbased import LanguageModel
    from jaxbased.generation import decode_cache_bytes
    from jaxbased.quantization.mamba import SCHEMES, parameter_bytes

    ablation = Ablation(config, params, dataset, settings)
    length = settings["prompt_len"] + settings["decode_steps"]
    rows, models = [], {}
    for name, hadamard, observer, arithmetic in VARIANTS:
        if hadamard is None:
            model, model_params = LanguageModel(config), params
        else:
            model, model_params = ablation.quantized(hadamard, observer, arithmetic)
        models[name] = (model, model_params)
        rows.append(
            ablation.score(
                model,
                model_params,
                variant=name,
                hadamard=hadamard,
                ssm_input_observer=observer,
                arithmetic=arithmetic or "float32",
                parameter_bytes=parameter_bytes(model_params).total,
                parameter_bytes_by_dtype=parameter_bytes(model_params).by_dtype,
                cache_bytes_per_sequence=decode_cache_bytes(model, 1, length),
            )
        )
    by_name = {row["variant"]: row for row in rows}
    step_effects = step_differences(rows, ablation)

    prompt = [int(t) for t in ablation.eval_tokens[: settings["prompt_len"]]]
    timings = decode_timings(
        {"fp32": models["fp32"], "+both": models["+both"]},
        prompt,
        settings["decode_steps"],
        settings["repeats"],
    )
    for name, timing in timings.items():
        by_name[name]["decode_ms_per_token"] = timing["best"]
        by_name[name]["decode_ms_per_token_median"] = timing["median"]
        by_name[name]["decode_ms_per_token_runs"] = timing["runs"]

    sensitivity = []
    if settings["sensitivity"]:
        for hadamard in (False, True):
            points = tuple(
                dict.fromkeys(
                    point
                    for name in config.layer_pattern
                    for point in SCHEMES[name].activation_points
                )
            )
            for rounded in ((), *[(point,) for point in points]):
                observers = ["min_max", "percentile"] if rounded == ("ssm_input",) else ["min_max"]
                for observer in observers:
                    model, model_params = ablation.quantized(hadamard, observer, points=rounded)
                    sensitivity.append(
                        ablation.score(
                            model,
                            model_params,
                            variant=f"only {','.join(rounded) or 'weights'}",
                            hadamard=hadamard,
                            rounded_points=list(rounded),
                            ssm_input_observer=observer,
                        )
                    )

    calibration_sweep = []
    sizes = sorted({*settings["calibration_sizes"], settings["calibration_windows"]})
    for count in [size for size in sizes if size <= len(ablation.sequences)]:
        calibration = ablation.calibration(True, count)
        for observer in ("min_max", "percentile"):
            model, model_params = ablation.quantized(True, observer, calibration=calibration)
            calibration_sweep.append(
                ablation.score(
                    model,
                    model_params,
                    variant=f"{count} window{'s' if count > 1 else ''}",
                    calibration_windows=count,
                    calibration_data=settings["calibration_split"],
                    ssm_input_observer=observer,
                )
            )
    random_calibration = ablation.calibration(True, None, random=True)
    for observer in ("min_max", "percentile"):
        model, model_params = ablation.quantized(True, observer, calibration=random_calibration)
        calibration_sweep.append(
            ablation.score(
                model,
                model_params,
                variant=f"{settings['calibration_windows']} random windows",
                calibration_windows=settings["calibration_windows"],
                calibration_data="uniform random token ids",
                ssm_input_observer=observer,
            )
        )

    percentile_sweep = []
    for percentile in settings["percentiles"]:
        calibration = ablation.calibration(True, None, percentile=percentile)
        model, model_params = ablation.quantized(True, "percentile", calibration=calibration)
        percentile_sweep.append(
            ablation.score(model, model_params, variant=f"p {percentile}", percentile=percentile)
        )
    percentile_sweep.append({**by_name["+both"], "variant": "p 0.99999", "percentile": 0.99999})

    return {
        "rows": rows,
        "step_effects": step_effects,
        "sensitivity": sensitivity,
        "calibration_sweep": calibration_sweep,
        "percentile_sweep": percentile_sweep,
        "ranges": calibrated_ranges(ablation),
    }


def step_differences(rows: list[dict[str, Any]], ablation: Ablation) -> dict[str, list[float]]:
    """``{"A vs B": [loss difference, standard error]}`` of each step added to its base."""
    by_name = {row["variant"]: row for row in rows}
    counts = ablation_counts(ablation)
    pairs = (
        ("+percentile", "W8A8"),
        ("+Hadamard", "W8A8"),
        ("+both", "+Hadamard"),
        ("+both", "+percentile"),
        ("+both (fake)", "+both"),
    )
    return {
        f"{name} vs {base}": list(
            paired_difference(by_name[name]["window_nll"], by_name[base]["window_nll"], counts)
        )
        for name, base in pairs
    }


def ablation_counts(ablation: Ablation):
    """The predicted tokens of each eval window (the windows of :func:`window_losses`)."""
    import numpy as np

    size, seq_len = ablation.eval_tokens.size, ablation.settings["eval_seq_len"]
    starts = np.arange(0, size - 1, seq_len)
    return np.minimum(starts + seq_len + 1, size) - starts - 1


def calibrated_ranges(ablation: Ablation) -> list[dict[str, Any]]:
    """Per layer, ``127 ·`` the calibrated scales: the SSM input's min-max and percentile
    ranges, ``out_proj``'s input range without and with the rotation."""
    plain, rotated = ablation.calibration(False), ablation.calibration(True)
    return [
        {
            "layer": layer,
            "ssm_input_min_max": 127 * plain.min_max[layer]["ssm_input"],
            "ssm_input_percentile": 127 * plain.percentile[layer],
            "out_proj_input_min_max": 127 * plain.min_max[layer]["out_proj_input"],
            "out_proj_input_min_max_rotated": 127 * rotated.min_max[layer]["out_proj_input"],
        }
        for layer in plain.min_max
    ]


# Tables -------------------------------------------------------------------------------------
def _difference(row: dict[str, Any]) -> str:
    return f"{row['vs_fp32']:+.4f} ± {row['vs_fp32_standard_error']:.4f}"


def tables(payload: dict[str, Any]) -> str:
    results, settings = payload["results"], payload["settings"]
    rows = results["rows"]
    base = rows[0]
    lines = [
        f"Quamba ablation: {payload['model']} ({settings['calibration_windows']} calibration "
        f"windows of {settings['seq_len']} tokens; eval {base['eval_tokens']:,} tokens of "
        f"{settings['eval_split']} in {base['eval_windows']} windows), {payload['date']}",
        "",
        "| variant | Hadamard | SSM-input scale | arithmetic | eval loss | vs fp32 (± SE) "
        "| weight bytes | cache bytes/seq | decode ms/token (best, median) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        decode = row.get("decode_ms_per_token")
        decode_text = (
            "" if decode is None else f"{decode:.3f}, {row['decode_ms_per_token_median']:.3f}"
        )
        lines.append(
            f"| {row['variant']} | {'-' if row['hadamard'] is None else row['hadamard']} "
            f"| {row['ssm_input_observer'] or '-'} | {row['arithmetic']} "
            f"| {row['eval_loss']:.4f} | {_difference(row)} "
            f"| {row['parameter_bytes']:,} | {row['cache_bytes_per_sequence']:,} "
            f"| {decode_text} |"
        )
    lines += ["", "| step | loss difference (± SE) |", "|---|---:|"]
    for name, (difference, error) in results["step_effects"].items():
        lines.append(f"| {name} | {difference:+.5f} ± {error:.5f} |")
    if results["sensitivity"]:
        lines += [
            "",
            "Only one activation point rounded (all weights int8):",
            "",
            "| rounded | SSM-input scale | no rotation: vs fp32 | rotation: vs fp32 |",
            "|---|---|---:|---:|",
        ]
        cells: dict[tuple[str, str], dict[bool, str]] = {}
        for row in results["sensitivity"]:
            key = (row["variant"], row["ssm_input_observer"])
            cells.setdefault(key, {})[row["hadamard"]] = _difference(row)
        for (variant, observer), by_rotation in cells.items():
            lines.append(
                f"| {variant} | {observer} | {by_rotation.get(False, '')} "
                f"| {by_rotation.get(True, '')} |"
            )
    lines += [
        "",
        "Calibration data (rotation on):",
        "",
        "| calibration | data | SSM-input scale | eval loss | vs fp32 (± SE) |",
        "|---|---|---|---:|---:|",
    ]
    for row in results["calibration_sweep"]:
        lines.append(
            f"| {row['variant']} | {row['calibration_data']} | {row['ssm_input_observer']} "
            f"| {row['eval_loss']:.4f} | {_difference(row)} |"
        )
    lines += [
        "",
        "SSM-input percentile (rotation on):",
        "",
        "| percentile | eval loss | vs fp32 (± SE) |",
        "|---|---:|---:|",
    ]
    for row in results["percentile_sweep"]:
        lines.append(f"| {row['percentile']} | {row['eval_loss']:.4f} | {_difference(row)} |")
    lines += [
        "",
        "Calibrated ranges (127 · scale) per layer:",
        "",
        "| layer | SSM input: min-max | SSM input: percentile | out_proj input: min-max "
        "| out_proj input: rotated |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["ranges"]:
        lines.append(
            f"| {row['layer']} | {row['ssm_input_min_max']:.3f} "
            f"| {row['ssm_input_percentile']:.3f} | {row['out_proj_input_min_max']:.3f} "
            f"| {row['out_proj_input_min_max_rotated']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".bench-", suffix=".md.tmp", dir=folder)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _positive_integers(name: str) -> list[int]:
    try:
        values = [int(value) for value in FLAGS[name].value]
    except ValueError as error:
        raise app.UsageError(f"--{name}={FLAGS[name].value}: {error}") from None
    if any(value < 1 for value in values):
        raise app.UsageError(f"--{name}={FLAGS[name].value}: each must be >= 1")
    return values


def _percentiles() -> list[float]:
    try:
        values = [float(value) for value in FLAGS.percentiles]
    except ValueError as error:
        raise app.UsageError(f"--percentiles={FLAGS.percentiles}: {error}") from None
    if any(not 0 < value <= 1 for value in values):
        raise app.UsageError(f"--percentiles={FLAGS.percentiles}: each must be in (0, 1]")
    return values


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    settings = {
        name: FLAGS[name].value
        for name in (
            "calibration_split",
            "eval_split",
            "num_sequences",
            "seq_len",
            "eval_tokens",
            "eval_seq_len",
            "eval_batch_size",
            "prompt_len",
            "decode_steps",
            "repeats",
            "sensitivity",
        )
    }
    settings["calibration_sizes"] = _positive_integers("calibration_sizes")
    settings["percentiles"] = _percentiles()
    output, markdown = FLAGS.output, FLAGS.markdown
    with tempfile.TemporaryDirectory() as scratch:
        if FLAGS.quick:
            config, params, dataset = quick_inputs(pathlib.Path(scratch))
            settings.update(
                num_sequences=8, seq_len=128, eval_tokens=4096, eval_seq_len=256,
                prompt_len=16, decode_steps=32, repeats=1, calibration_sizes=[1],
                percentiles=[0.999],
            )  # fmt: skip
            model_name = "random tiny Mamba (d 64, 2 layers)"
            if output == FLAGS["output"].default:
                output = "/tmp/quamba_ablation_quick.json"
            if markdown == FLAGS["markdown"].default:
                markdown = "/tmp/quamba_ablation_quick.md"
        else:
            if FLAGS.data is None or (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
                raise app.UsageError("give --data and exactly one of --workdir / --checkpoint")
            from jaxbased.data.token_store import TokenDataset
            from jaxbased.evaluation import load_model

            config, params, _ = load_model(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint)
            dataset = TokenDataset.open(FLAGS.data)
            model_name = FLAGS.workdir or FLAGS.checkpoint
        started = time.perf_counter()
        results = run(config, params, dataset, settings)
    payload = {
        "benchmark": "quamba_ablation",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "machine": machine_info(),
        "model": model_name,
        "config": config.to_dict(),
        "settings": settings,
        "results": results,
        "wall_seconds": time.perf_counter() - started,
    }
    text = tables(payload)
    print()
    print(text)
    if output:
        write_json_atomic(output, payload)
        print(f"wrote {output}")
    if markdown:
        write_text_atomic(markdown, text)
        print(f"wrote {markdown}")


if __name__ == "__main__":
    app.run(main)
