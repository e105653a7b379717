"""EchoAtt on the demo corpus: a Transformer++ teacher, its attention-similarity heat map, and
students that share about 25%, 50% and 75% of its layers, each distilled then trained on the
language-model loss for the same small budget (docs/echoatt.md).

Steps:

1. The teacher: ``--teacher_workdir`` (default ``workdirs/demo_transformer``, what
   ``train.py --config=configs/demo_mixers.py:transformer --workdir=workdirs/demo_transformer``
   leaves: ~1M parameters, 6 attention layers, 300 steps of the demo recipe). If it holds no
   checkpoint, the benchmark trains it first with that recipe.
2. The heat map of its attention-map cosine similarity (``jaxbased.echoatt``) on the first
   ``--similarity_sequences`` validation rows, the rows ``train.py``'s ``share_fraction``
   measures on, to ``--figure``.
3. One ``train.py`` run (:func:`jaxbased.training.loop.train`) per ``--fractions`` entry, in
   ``--workdir``/share<percent>: ``config.distill.share_fraction`` picks the most alike layers
   (never layer 0), ``--distill_steps`` distillation steps, then ``--lm_steps`` language-model
   steps, at the student learning rate. Baselines at the same budget: the teacher trained on
   for ``distill_steps + lm_steps`` language-model steps (``teacher+``), and, with
   ``--ablation_fraction``, that student trained on the language-model loss only
   (``distill.steps=0``).
4. Per model: the evaluation loss (``train.py``'s final evaluation: ``eval_batches`` validation
   batches), the parameter count, and greedy decode ms/token of ``jaxbased.generate`` for each
   ``--decode_cases`` prompt length and batch (the best of ``--decode_repeats`` runs after a
   compiling one; every model in this process one after another, so side by side).
   ``--decode_only`` times the decoding of the runs of an existing ``--output`` again.

Usage (from the repository root)::

    python benchmarks/echoatt.py                     # the defaults, BENCHMARKS.md's numbers
    python benchmarks/echoatt.py --distill_steps=2 --lm_steps=1 --output=/tmp/e.json \\
        --figure=/tmp/e.png --workdir=/tmp/echoatt   # a smoke run

The JSON goes to ``--output`` (atomically), the markdown table to stdout.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json_atomic

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("teacher_workdir", "workdirs/demo_transformer", "The teacher's workdir.")
flags.DEFINE_string("workdir", "workdirs/echoatt", "Where the students' runs go (replaced).")
flags.DEFINE_list("fractions", ["0.25", "0.5", "0.75"], "distill.share_fraction of each student.")
flags.DEFINE_integer("distill_steps", 50, "Distillation steps of each student.")
flags.DEFINE_integer("lm_steps", 25, "Language-model steps after them.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate of the students and teacher+.")
flags.DEFINE_float("final_learning_rate", 1e-4, "Final (cosine) learning rate.")
flags.DEFINE_integer("warmup_steps", 10, "Warm-up steps.")
flags.DEFINE_float("ablation_fraction", 0.5, "Also train this student without distillation.")
flags.DEFINE_integer("similarity_sequences", 16, "Validation rows of the similarity.")
flags.DEFINE_list(
    "decode_cases", ["256x1", "256x8", "2048x8"], "Decode timings: PROMPT_TOKENS x BATCH each."
)
flags.DEFINE_integer("decode_tokens", 256, "Tokens decoded per timing run.")
flags.DEFINE_integer("decode_repeats", 3, "Timed decode runs per case (the best is kept).")
flags.DEFINE_bool(
    "decode_only",
    False,
    "Only time the decoding again, of the runs --output already lists (updates it).",
)
flags.DEFINE_string("output", "benchmarks/results/echoatt.json", "The JSON ('' for none).")
flags.DEFINE_string(
    "figure", "benchmarks/results/echoatt_similarity.png", "The similarity heat map (PNG)."
)


def demo_config():
    """``configs/demo_mixers.py:transformer``: the ~1M-parameter Transformer++ demo recipe."""
    from jaxbased.config_files import sibling_get_config

    return sibling_get_config(str(REPO / "configs" / "demo.py"), "demo_mixers")("transformer")


def ensure_teacher(workdir: pathlib.Path) -> dict[str, Any]:
    """Train the teacher with the demo recipe unless ``workdir`` holds a checkpoint."""
    from jaxbased.training.loop import train

    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        return {"trained_here": False}
    start = time.monotonic()
    config = demo_config()
    config.sample.max_new_tokens = 0
    train(config, workdir)
    return {"trained_here": True, "wall_seconds": time.monotonic() - start}


def run_config(data_workdir: pathlib.Path, num_steps: int, **distill: Any):
    """The demo recipe for ``num_steps`` steps at the benchmark's learning rate, on the prepared
    built-in corpus of ``data_workdir`` (the teacher's), with ``distill`` set in
    ``config.distill``."""
    config = demo_config()
    config.data.path = str(data_workdir / "builtin_data")
    config.train.update(
        num_steps=num_steps,
        learning_rate=FLAGS.learning_rate,
        final_learning_rate=FLAGS.final_learning_rate,
        warmup_steps=FLAGS.warmup_steps,
        eval_every=10**9,
        checkpoint_every=10**9,
        log_every=10,
    )
    config.sample.max_new_tokens = 0
    config.distill.update(distill)
    return config


def teacher_plus_config(teacher_workdir: pathlib.Path, workdir: pathlib.Path, steps: int):
    """The teacher trained on: its last checkpoint copied to ``workdir`` as step 0 (with a
    fresh optimizer, as a student starts), then ``steps`` language-model steps."""
    from jaxbased.data.tokenizers import ByteTokenizer
    from jaxbased.interop.workdir import write_workdir
    from jaxbased.training.checkpointing import load_for_inference

    config, params, _ = load_for_inference(teacher_workdir)
    write_workdir(
        workdir, config, params, ByteTokenizer(), source={"teacher": str(teacher_workdir)}
    )
    return run_config(teacher_workdir, steps)


def similarity_of_teacher(teacher_workdir: pathlib.Path, config) -> dict[str, Any]:
    """The teacher's similarity matrix on the rows ``share_fraction`` measures on, its heat
    map, and the layers each fraction shares."""
    from jaxbased import LanguageModel
    from jaxbased.data.pipeline import validation_batches
    from jaxbased.data.token_store import TokenDataset
    from jaxbased.echoatt import (
        attention_similarity,
        mean_similarity,
        most_similar_layers,
        plot_similarity,
        unrolled,
    )
    from jaxbased.training.checkpointing import load_for_inference
    from jaxbased.training.distill_run import similarity_rows

    model_config, params, _ = load_for_inference(teacher_workdir)
    model_config, params = unrolled(model_config, params)
    validation = validation_batches(
        TokenDataset.open(teacher_workdir / "builtin_data"),
        seq_len=config.data.seq_len,
        batch_size=config.data.batch_size,
        max_batches=config.train.eval_batches,
    )
    rows = similarity_rows(validation, FLAGS.similarity_sequences)
    similarity = attention_similarity(LanguageModel(model_config), params, rows)
    layers = model_config.attention_map_layers
    if FLAGS.figure:
        plot_similarity(
            similarity,
            layers,
            FLAGS.figure,
            title=f"demo Transformer++: attention-map cosine similarity, "
            f"{sum(len(r) for r in rows)} x {rows[0].shape[1]} tokens",
        )
    chosen = {
        fraction: most_similar_layers(
            model_config, similarity, round(float(fraction) * len(layers))
        )
        for fraction in FLAGS.fractions
    }
    return {
        "layers": list(layers),
        "similarity": np.round(similarity, 4).tolist(),
        "mean_similarity": np.round(mean_similarity(similarity), 4).tolist(),
        "sharing_by_fraction": {
            str(float(f)): [list(p) for p in pairs] for f, pairs in chosen.items()
        },
    }


def decode_cases() -> list[tuple[int, int]]:
    """``--decode_cases`` as ``(prompt tokens, batch)`` pairs."""
    cases = []
    for case in FLAGS.decode_cases:
        prompt, _, batch = case.partition("x")
        if not (prompt.isdigit() and batch.isdigit() and int(prompt) > 0 and int(batch) > 0):
            raise app.UsageError(f"--decode_cases: {case!r} is not PROMPT_TOKENS x BATCH")
        cases.append((int(prompt), int(batch)))
    return cases


def case_key(prompt: int, batch: int) -> str:
    return f"prompt_{prompt}_batch_{batch}"


def decode_ms_per_token(workdir: pathlib.Path, tokens: np.ndarray) -> dict[str, float]:
    """Greedy decode ms/token of the workdir's model for each of :func:`decode_cases`: the
    first ``prompt`` of ``tokens`` as every row's prompt, ``jaxbased.generate``'s decode time
    over ``--decode_tokens`` steps, the best of ``--decode_repeats`` runs after a compiling
    one."""
    from jaxbased import LanguageModel, generate
    from jaxbased.training.checkpointing import load_for_inference

    config, params, _ = load_for_inference(workdir)
    model = LanguageModel(config)
    timings = {}
    for prompt, batch in decode_cases():
        prompts = np.repeat(tokens[None, :prompt], batch, axis=0)
        arguments = dict(max_new_tokens=FLAGS.decode_tokens, temperature=0.0)
        generate(model, params, prompts, **arguments)  # compiles
        best = min(
            generate(model, params, prompts, **arguments).decode_seconds
            for _ in range(FLAGS.decode_repeats)
        )
        timings[case_key(prompt, batch)] = 1000 * best / FLAGS.decode_tokens
    return timings


def decode_prompt_tokens(validation: Sequence[np.ndarray]) -> np.ndarray:
    """The validation tokens, row after row (inputs only), long enough for every case."""
    tokens = np.concatenate([row[:-1] for batch in validation for row in batch]).astype(np.int32)
    longest = max(prompt for prompt, _ in decode_cases())
    if len(tokens) < longest:
        raise app.UsageError(f"--decode_cases: the validation data has only {len(tokens)} tokens")
    return tokens


def measure_decoding(rows: list[dict], tokens: np.ndarray) -> dict[str, Any]:
    """Time every row's model (one after another, in this process) and the conditions."""
    started = time.monotonic()
    for row in rows:
        row["decode_ms_per_token"] = decode_ms_per_token(pathlib.Path(row["workdir"]), tokens)
    return {
        "cases": [list(case) for case in decode_cases()],
        "tokens": FLAGS.decode_tokens,
        "repeats": FLAGS.decode_repeats,
        "load_average_after": os.getloadavg(),
        "wall_seconds": time.monotonic() - started,
    }


def train_run(name: str, config, workdir: pathlib.Path) -> dict[str, Any]:
    from jaxbased.training.loop import train

    start = time.monotonic()
    result = train(config, workdir)
    wall = time.monotonic() - start
    logging.info("%s: eval loss %.4f in %.0f s", name, result.final_eval["loss"], wall)
    return {
        "name": name,
        "workdir": str(workdir),
        "eval_loss": result.final_eval["loss"],
        "eval_accuracy": result.final_eval["accuracy"],
        "initial_eval_loss": None if result.initial_eval is None else result.initial_eval["loss"],
        "parameters": result.parameters,
        "wall_seconds": wall,
    }


def markdown(rows: list[dict]) -> str:
    cases = decode_cases()
    header = [
        "model",
        "shared layers",
        "parameters",
        "eval loss at start",
        "eval loss",
        "accuracy",
        *[f"decode ms/token, prompt {p}, batch {b}" for p, b in cases],
    ]
    lines = [
        "shared layers: sharing layer:anchor",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|" + "---:|" * (len(header) - 2),
    ]
    for row in rows:
        start = row.get("initial_eval_loss")
        cells = [
            row["name"],
            ", ".join(f"{s}:{a}" for s, a in row["attention_sharing"]) or "-",
            f"{row['parameters']:,}",
            "-" if start is None else f"{start:.3f}",
            f"{row['eval_loss']:.3f}",
            f"{row['eval_accuracy']:.3f}",
            *[f"{row['decode_ms_per_token'][case_key(p, b)]:.2f}" for p, b in cases],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def decode_again() -> None:
    """``--decode_only``: time the decoding of the runs in ``--output`` again and update it."""
    import json

    from jaxbased.data.pipeline import validation_batches
    from jaxbased.data.token_store import TokenDataset

    payload = json.loads(pathlib.Path(FLAGS.output).read_text())
    settings = payload["settings"]
    validation = validation_batches(
        TokenDataset.open(pathlib.Path(settings["teacher_workdir"]) / "builtin_data"),
        seq_len=settings["seq_len"],
        batch_size=settings["batch_size"],
        max_batches=settings["eval_batches"],
    )
    payload["decode"] = measure_decoding(payload["rows"], decode_prompt_tokens(validation))
    payload["decode_machine"] = machine_info()
    print(markdown(payload["rows"]))
    write_json_atomic(FLAGS.output, payload)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from jaxbased.data.pipeline import validation_batches
    from jaxbased.data.token_store import TokenDataset
    from jaxbased.training.checkpointing import load_for_inference

    if FLAGS.decode_only:
        decode_again()
        return
    began = time.monotonic()
    teacher_workdir = pathlib.Path(FLAGS.teacher_workdir).absolute()
    root = pathlib.Path(FLAGS.workdir).absolute()
    teacher_source = ensure_teacher(teacher_workdir)
    budget = FLAGS.distill_steps + FLAGS.lm_steps
    base = run_config(teacher_workdir, budget)
    similarity = similarity_of_teacher(teacher_workdir, base)

    shutil.rmtree(root, ignore_errors=True)
    teacher_config, teacher_params, _ = load_for_inference(teacher_workdir)
    from jaxbased import LanguageModel, count_parameters
    from jaxbased.training.steps import evaluate, make_eval_step

    validation = validation_batches(
        TokenDataset.open(teacher_workdir / "builtin_data"),
        seq_len=base.data.seq_len,
        batch_size=base.data.batch_size,
        max_batches=base.train.eval_batches,
    )
    teacher_eval = evaluate(
        make_eval_step(LanguageModel(teacher_config)), teacher_params, validation
    )
    rows: list[dict[str, Any]] = [
        {
            "name": "teacher",
            "workdir": str(teacher_workdir),
            "eval_loss": teacher_eval["loss"],
            "eval_accuracy": teacher_eval["accuracy"],
            "initial_eval_loss": None,
            "parameters": count_parameters(teacher_params),
            "wall_seconds": teacher_source.get("wall_seconds"),
        }
    ]
    plus = root / "teacher_plus"
    rows.append(train_run("teacher+", teacher_plus_config(teacher_workdir, plus, budget), plus))
    layers = len(similarity["layers"])

    def student_name(fraction: float, suffix: str = "") -> str:
        shared = round(fraction * layers)
        return f"share {fraction:g} ({shared}/{layers} layers){suffix}"

    runs = [
        (student_name(float(f)), f, FLAGS.distill_steps, root / f"share{round(100 * float(f))}")
        for f in FLAGS.fractions
    ]
    if FLAGS.ablation_fraction:
        fraction = FLAGS.ablation_fraction
        runs.append(
            (
                student_name(fraction, ", no distillation"),
                str(fraction),
                0,
                root / f"share{round(100 * fraction)}_lm_only",
            )
        )
    for name, fraction, distill_steps, workdir in runs:
        config = run_config(
            teacher_workdir,
            budget,
            teacher_workdir=str(teacher_workdir),
            steps=distill_steps,
            share_fraction=float(fraction),
            similarity_sequences=FLAGS.similarity_sequences,
        )
        row = train_run(name, config, workdir)
        row.update(share_fraction=float(fraction), distill_steps=distill_steps)
        rows.append(row)

    for row in rows:
        config = load_for_inference(row["workdir"])[0]
        row["attention_sharing"] = [list(pair) for pair in config.attention_sharing]
        expected = similarity["sharing_by_fraction"].get(str(row.get("share_fraction")))
        if expected is not None and expected != row["attention_sharing"]:
            logging.warning(
                "%s shares %s but the similarity here proposes %s",
                row["name"],
                row["attention_sharing"],
                expected,
            )
    decode = measure_decoding(rows, decode_prompt_tokens(validation))
    table = markdown(rows)
    print(table)
    if FLAGS.output:
        write_json_atomic(
            FLAGS.output,
            {
                "machine": machine_info(),
                "settings": {
                    "teacher_workdir": str(teacher_workdir),
                    "teacher": teacher_source,
                    "fractions": [float(f) for f in FLAGS.fractions],
                    "distill_steps": FLAGS.distill_steps,
                    "lm_steps": FLAGS.lm_steps,
                    "learning_rate": FLAGS.learning_rate,
                    "final_learning_rate": FLAGS.final_learning_rate,
                    "warmup_steps": FLAGS.warmup_steps,
                    "batch_size": base.data.batch_size,
                    "seq_len": base.data.seq_len,
                    "eval_batches": base.train.eval_batches,
                },
                "decode": decode,
                "similarity": similarity,
                "rows": rows,
                "wall_seconds": time.monotonic() - began,
            },
        )


if __name__ == "__main__":
    app.run(main)
