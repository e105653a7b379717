"""Recycled Attention on a trained Transformer++: perplexity and decode time against ``K`` and
the stride, beside full attention and the local-only "last K tokens" baseline at the same ``K``
(docs/recycled_attention.md).

Each of ``--windows`` windows of ``--context`` tokens from the data is scored by teacher-forced
decoding (``jaxbased.generation.teacher_forced_logprobs``): the first ``context - scored``
tokens are prefilled (full attention), then each of the last ``--scored_tokens`` tokens is fed by
one decode step of the policy, and its log-probability is the model's given what precedes it.
All windows form one batch. Rows:

- ``full``: plain full attention (no policy), the reference;
- ``recycled``: ``RecycledAttentionPolicy(top_k=K, stride=S)`` for each ``K`` in ``--top_k``
  and ``S`` in ``--strides`` (and, with ``--similarity_threshold``, the dynamic rule at each
  ``K``: ``stride`` off, a check every ``--check_every`` steps);
- ``local``: ``RecycledAttentionPolicy.local_only(K)``: the last ``K`` positions, no full step.

Decode ms/token is the teacher-forced decode loop's wall time over its steps (one step serves
every window of the batch), from a second run after one that compiles. Perplexity is
``exp(-mean log p)`` over every scored token.

Usage (from the repository root)::

    python train.py --config=configs/demo_mixers.py:transformer \\
        --workdir=workdirs/demo_transformer --config.data.seq_len=4096
    python benchmarks/recycled_attention.py --workdir=workdirs/demo_transformer --context=4096
    python benchmarks/recycled_attention.py --quick --output=/tmp/ra.json  # tiny random model

(The demo recipe trains on 256-token sequences; a model meant for 4k contexts should see them in
training, hence ``--config.data.seq_len``.)

The data is ``--data`` (a ``jaxbased-prepare-data`` folder), else the workdir's own built-in
corpus (``builtin_data/``, what ``train.py`` made from the demo corpus); validation split. The
JSON goes to ``--output`` (written atomically), the markdown table to stdout and ``--markdown``.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "train.py workdir of a model with full-attention layers.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
flags.DEFINE_string("data", None, "Prepared dataset (default: the workdir's builtin_data/).")
flags.DEFINE_integer("context", 4096, "Tokens per window (prefilled + scored).")
flags.DEFINE_integer("scored_tokens", 256, "Tokens at the end of each window scored by decoding.")
flags.DEFINE_integer("windows", 4, "Windows (rows of one batch), evenly spread over the split.")
flags.DEFINE_list("top_k", ["64", "256", "1024"], "Recycled set sizes K.")
flags.DEFINE_list("strides", ["5", "10", "50"], "Strides S.")
flags.DEFINE_float("similarity_threshold", None, "Also run the dynamic rule with this s.")
flags.DEFINE_integer("check_every", 5, "Steps between similarity checks of the dynamic rule.")
flags.DEFINE_enum(
    "head_selection", "group_max", ["group_max", "first_head"], "How the set is chosen."
)
flags.DEFINE_bool("quick", False, "A tiny random Transformer++ on random tokens (smoke run).")
flags.DEFINE_string(
    "output", "benchmarks/results/recycled_attention.json", "The JSON ('' for none)."
)
flags.DEFINE_string("markdown", "", "Also write the markdown table here.")

QUICK = {
    "context": 48,
    "scored_tokens": 8,
    "windows": 2,
    "top_k": [4, 16],
    "strides": [2, 4],
    "similarity_threshold": 0.8,
}


def quick_model() -> tuple[Any, Any]:
    """A random 2-layer Transformer++ (d 32, 2 heads), vocabulary 256, and its parameters."""
    import jax
    import jax.numpy as jnp

    from jaxbased import LanguageModel, ModelConfig

    config = ModelConfig(
        vocab_size=256,
        d_model=32,
        num_layers=2,
        layer_pattern=("attention",) * 2,
        mlp={"inner_dim": 64},
        attention={"heads": 2, "rotary_fraction": 0.5},
        init_std=0.2,
    )
    variables = LanguageModel(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return config, variables["params"]


def windows_of(tokens: Any, count: int, length: int) -> np.ndarray:
    """``[count, length]`` int32: windows starting at evenly spread offsets of ``tokens``."""
    total = int(tokens.shape[0])
    if total < length:
        raise ValueError(f"the split holds {total} tokens, fewer than --context={length}")
    starts = np.linspace(0, total - length, count).astype(np.int64)
    return np.stack([np.asarray(tokens[s : s + length], np.int32) for s in starts])


def load(settings: dict) -> tuple[Any, Any, np.ndarray, dict]:
    """The model config, parameters, the ``[windows, context]`` tokens and a description."""
    if settings["quick"]:
        config, params = quick_model()
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, config.vocab_size, (settings["windows"], settings["context"]))
        return config, params, tokens.astype(np.int32), {"model": "random d32 x 2 (quick)"}
    from jaxbased.data.token_store import TokenDataset
    from jaxbased.evaluation import load_model

    if settings["workdir"] is None:
        raise app.UsageError("give --workdir (a Transformer++ train.py run) or --quick")
    config, params, _ = load_model(workdir=settings["workdir"], step=settings["step"])
    data = settings["data"] or str(pathlib.Path(settings["workdir"]) / "builtin_data")
    dataset = TokenDataset.open(data)
    tokens = windows_of(dataset.tokens("validation"), settings["windows"], settings["context"])
    return config, params, tokens, {"model": settings["workdir"], "data": data}


def policies(settings: dict) -> list[tuple[str, Any]]:
    """``(kind, policy)`` for every measured row (``full``: None)."""
    from jaxbased import RecycledAttentionPolicy

    rows: list[tuple[str, Any]] = [("full", None)]
    for k in settings["top_k"]:
        for stride in settings["strides"]:
            rows.append(
                (
                    "recycled",
                    RecycledAttentionPolicy(
                        top_k=k, stride=stride, head_selection=settings["head_selection"]
                    ),
                )
            )
        if settings["similarity_threshold"] is not None:
            rows.append(
                (
                    "dynamic",
                    RecycledAttentionPolicy(
                        top_k=k,
                        stride=2**30,
                        similarity_threshold=settings["similarity_threshold"],
                        check_every=settings["check_every"],
                        head_selection=settings["head_selection"],
                    ),
                )
            )
        rows.append(("local", RecycledAttentionPolicy.local_only(k)))
    return rows


def measure(config: Any, params: Any, tokens: np.ndarray, settings: dict) -> list[dict]:
    from jaxbased import LanguageModel, RecycledAttentionPolicy
    from jaxbased.generation import check_recycled_attention, teacher_forced_logprobs

    model = LanguageModel(config)
    check_recycled_attention(config, RecycledAttentionPolicy(top_k=1))  # has full attention
    prompt_length = tokens.shape[1] - settings["scored_tokens"]
    steps = settings["scored_tokens"] - 1
    results = []
    for kind, policy in policies(settings):
        teacher_forced_logprobs(model, params, tokens, prompt_length, recycled_attention=policy)
        run = teacher_forced_logprobs(
            model, params, tokens, prompt_length, recycled_attention=policy
        )
        row = {
            "kind": kind,
            "top_k": None if policy is None else policy.top_k,
            "stride": None if policy is None or policy.stride >= 2**30 else policy.stride,
            "similarity_threshold": None if policy is None else policy.similarity_threshold,
            "perplexity": run.perplexity,
            "mean_logprob": float(np.mean(run.logprobs.astype(np.float64))),
            "decode_ms_per_token": 1e3 * run.decode_seconds / max(steps, 1),
            "prefill_seconds": run.prefill_seconds,
            "full_step_fraction": (
                1.0 if policy is None else float(np.mean(run.full_attention_steps)) / max(steps, 1)
            ),
        }
        print(row, flush=True)
        results.append(row)
    return results


def markdown(rows: list[dict], settings: dict) -> str:
    header = ["policy", "K", "stride", "perplexity", "decode ms/token", "full steps"]
    lines = [
        f"context {settings['context']}, last {settings['scored_tokens']} tokens scored, "
        f"{settings['windows']} windows in one batch",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        stride = "-" if row["stride"] is None else str(row["stride"])
        if row["kind"] == "dynamic":
            stride = f"s={row['similarity_threshold']}"
        cells = [
            row["kind"],
            "-" if row["top_k"] is None else str(row["top_k"]),
            stride,
            f"{row['perplexity']:.4f}",
            f"{row['decode_ms_per_token']:.2f}",
            f"{row['full_step_fraction']:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    settings = {
        "workdir": FLAGS.workdir,
        "step": FLAGS.step,
        "data": FLAGS.data,
        "context": FLAGS.context,
        "scored_tokens": FLAGS.scored_tokens,
        "windows": FLAGS.windows,
        "top_k": [int(k) for k in FLAGS.top_k],
        "strides": [int(s) for s in FLAGS.strides],
        "similarity_threshold": FLAGS.similarity_threshold,
        "check_every": FLAGS.check_every,
        "head_selection": FLAGS.head_selection,
        "quick": FLAGS.quick,
    }
    if FLAGS.quick:
        settings.update(QUICK)
    if not 2 <= settings["scored_tokens"] < settings["context"]:
        raise app.UsageError("--scored_tokens must be in [2, --context)")
    config, params, tokens, source = load(settings)
    rows = measure(config, params, tokens, settings)
    table = markdown(rows, settings)
    print(table)
    if FLAGS.markdown:
        pathlib.Path(FLAGS.markdown).write_text(table)
    if FLAGS.output:
        write_json_atomic(
            FLAGS.output,
            {
                "machine": machine_info(),
                "settings": settings,
                "source": source,
                "model": config.to_dict(),
                "rows": rows,
            },
        )


if __name__ == "__main__":
    app.run(main)
