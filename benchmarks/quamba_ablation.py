"""Quamba ablation: what calibration, the percentile observer and the Hadamard rotation each do to
an int8 Mamba's eval loss, and what int8 does to decode speed and bytes (docs/quantization.md).

Rows (all static per-tensor W8A8 with the int8 arithmetic, one calibration per rotation setting
on the first ``--num_sequences`` windows of ``--seq_len`` tokens of ``--calibration_split``):

- ``fp32``: the float model;
- ``W8A8``: min-max scales everywhere, no rotation (naive);
- ``+percentile``: the SSM input's scale from the percentile-EMA observer;
- ``+Hadamard``: the rotation folded into ``out_proj``, min-max everywhere;
- ``+both``: Quamba (percentile and rotation);
- ``+both (fake)``: the same model in the fake-quant arithmetic (its loss should equal the
  row above to float rounding).

Eval loss is the mean next-token loss over the first ``--eval_tokens`` tokens of
``--eval_split`` in windows of ``--eval_seq_len`` (:mod:`jaxbased.evaluation.perplexity`).
Decode: greedy ``jaxbased.generate`` of ``--decode_steps`` tokens after a ``--prompt_len``
prompt at batch 1, timed on a second call (the first compiles); ms/token = decode seconds /
generated tokens, best of ``--repeats``. Bytes: the parameters (by dtype) and the decode cache
of one sequence.

Usage (from the repository root)::

    python benchmarks/quamba_ablation.py --workdir=workdirs/mamba --data=workdirs/mamba/data
    python benchmarks/quamba_ablation.py --quick    # random tiny Mamba, seconds

The JSON (machine, date, settings, rows) goes to ``--output`` (written atomically) and the
markdown table to stdout and ``--markdown``.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

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
flags.DEFINE_integer("decode_steps", 128, "decode: generated tokens")
flags.DEFINE_integer("repeats", 3, "decode: timed runs (the best is kept)")
flags.DEFINE_bool("quick", False, "random tiny Mamba and a small built-in dataset (a smoke run)")
flags.DEFINE_string("output", "benchmarks/results/quamba_ablation.json", "JSON ('' for none)")
flags.DEFINE_string("markdown", "benchmarks/results/quamba_ablation.md", "table ('' for none)")

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
    import jax
    import jax.numpy as jnp

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


def decode_ms_per_token(model, params, prompt: list[int], steps: int, repeats: int) -> float:
    """Best ms per generated token of greedy ``generate`` (after one compiling call)."""
    from jaxbased.generation import generate

    generate(model, params, [prompt], max_new_tokens=steps, temperature=0.0, stop_tokens=())
    best = float("inf")
    for _ in range(repeats):
        result = generate(
            model, params, [prompt], max_new_tokens=steps, temperature=0.0, stop_tokens=()
        )
        best = min(best, 1000 * result.decode_seconds / max(result.total_generated, 1))
    return best


def run(config, params, dataset, settings: dict[str, Any]) -> list[dict[str, Any]]:
    import numpy as np

    from jaxbased import LanguageModel
    from jaxbased.evaluation.perplexity import evaluate_perplexity
    from jaxbased.generation import decode_cache_bytes
    from jaxbased.quantization.calibration import calibrate, calibration_windows
    from jaxbased.quantization.mamba import (
        QuantizedLanguageModel,
        fold_hadamard,
        parameter_bytes,
        quantize_parameters,
        unrolled_config,
    )

    sequences = calibration_windows(
        dataset.tokens(settings["calibration_split"]),
        settings["num_sequences"],
        settings["seq_len"],
    )
    settings["calibration_windows"] = int(sequences.shape[0])
    prompt = [
        int(t) for t in np.asarray(dataset.tokens(settings["eval_split"])[: settings["prompt_len"]])
    ]
    calibrated: dict[bool, tuple[Any, Any]] = {}
    rows = []
    for name, hadamard, observer, arithmetic in VARIANTS:
        began = time.perf_counter()
        if hadamard is None:
            model, model_params = LanguageModel(config), params
        else:
            if hadamard not in calibrated:
                folded = fold_hadamard(config, params, hadamard)
                calibrated[hadamard] = (
                    folded,
                    calibrate(config, folded, sequences, hadamard=hadamard),
                )
            folded, calibration = calibrated[hadamard]
            model = QuantizedLanguageModel(
                unrolled_config(config), arithmetic=arithmetic, hadamard=hadamard
            )
            model_params = quantize_parameters(
                config, folded, calibration.activation_scales(observer)
            )
        evaluated = evaluate_perplexity(
            model,
            model_params,
            dataset,
            split=settings["eval_split"],
            seq_len=settings["eval_seq_len"],
            batch_size=settings["eval_batch_size"],
            max_tokens=settings["eval_tokens"],
        )
        row = {
            "variant": name,
            "hadamard": hadamard,
            "ssm_input_observer": observer,
            "arithmetic": arithmetic or "float32",
            "eval_loss": evaluated.loss,
            "eval_tokens": evaluated.tokens,
            "parameter_bytes": parameter_bytes(model_params).total,
            "parameter_bytes_by_dtype": parameter_bytes(model_params).by_dtype,
            "cache_bytes_per_sequence": decode_cache_bytes(
                model, 1, settings["prompt_len"] + settings["decode_steps"]
            ),
        }
        if name in ("fp32", "+both"):
            row["decode_ms_per_token"] = decode_ms_per_token(
                model, model_params, prompt, settings["decode_steps"], settings["repeats"]
            )
        row["seconds"] = time.perf_counter() - began
        rows.append(row)
        print(f"{name}: loss {row['eval_loss']:.4f} ({row['seconds']:.1f} s)", flush=True)
    return rows


def table(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    base = rows[0]
    lines = [
        f"Quamba ablation: {payload['model']} ({payload['settings']['calibration_windows']} "
        f"calibration windows of {payload['settings']['seq_len']} tokens; eval "
        f"{base['eval_tokens']:,} tokens of {payload['settings']['eval_split']}), "
        f"{payload['date']}",
        "",
        "| variant | Hadamard | SSM-input scale | arithmetic | eval loss | vs fp32 | weight bytes "
        "| cache bytes/seq | decode ms/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        decode = row.get("decode_ms_per_token")
        lines.append(
            f"| {row['variant']} | {'-' if row['hadamard'] is None else row['hadamard']} "
            f"| {row['ssm_input_observer'] or '-'} | {row['arithmetic']} "
            f"| {row['eval_loss']:.4f} | {row['eval_loss'] - base['eval_loss']:+.4f} "
            f"| {row['parameter_bytes']:,} | {row['cache_bytes_per_sequence']:,} "
            f"| {'' if decode is None else f'{decode:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


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
        )
    }
    output, markdown = FLAGS.output, FLAGS.markdown
    with tempfile.TemporaryDirectory() as scratch:
        if FLAGS.quick:
            config, params, dataset = quick_inputs(pathlib.Path(scratch))
            settings.update(
                num_sequences=8, seq_len=128, eval_tokens=4096, eval_seq_len=256,
                prompt_len=16, decode_steps=32, repeats=1,
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
        rows = run(config, params, dataset, settings)
    payload = {
        "benchmark": "quamba_ablation",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "machine": machine_info(),
        "model": model_name,
        "config": config.to_dict(),
        "settings": settings,
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    text = table(payload)
    print()
    print(text)
    if output:
        write_json_atomic(output, payload)
        print(f"wrote {output}")
    if markdown:
        pathlib.Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(markdown).write_text(text)
        print(f"wrote {markdown}")


if __name__ == "__main__":
    app.run(main)
