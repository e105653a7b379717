"""Training throughput and FLOP utilisation: BASED vs. Transformer++ of equal size at T = 2048.

For each model (``benchmarks/common.py``: about 8.6M parameters each, vocab 256) the script
compiles the real train step of ``train.py`` (AdamW, clipping, donated state; batch
``--batch_size`` x 2048), runs it once untimed, then times ``--steps`` steps and reports the median:
tokens/s, and model FLOP utilisation = analytical training FLOPs per token
(``jaxbased.training.flops``) x tokens/s / peak, where the peak is a float32 2048 x 2048 matmul
measured in the same run (docs/performance.md). XLA's own FLOP count of the compiled step is printed
beside the analytical one as a cross-check.

    python benchmarks/train_throughput.py                    # table + benchmarks/results/...json
    python benchmarks/train_throughput.py --quick            # seconds: T = 256, 2 steps
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MODEL_TITLES, machine_info, model_config, write_json_atomic

flags.DEFINE_integer("seq_len", 2048, "Sequence length.")
flags.DEFINE_integer("batch_size", 2, "Sequences per step.")
flags.DEFINE_integer("steps", 5, "Timed steps per model (median reported).")
flags.DEFINE_list("models", ["based", "transformer"], "Models to run.")
flags.DEFINE_string("output", "benchmarks/results/train_throughput.json", "JSON output path.")
flags.DEFINE_bool("quick", False, "Smoke run: T = 256, 2 steps, output under /tmp.")
FLAGS = flags.FLAGS


def matmul_peak(size: int = 2048, repeats: int = 7) -> float:
    """Best float32 ``size x size`` matmul FLOP/s seen by JAX on this machine."""
    from jaxbased.training.flops import measure_matmul_peak

    return measure_matmul_peak(size, repeats)


def measure(name: str, seq_len: int, batch_size: int, steps: int, peak: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import linen as nn

    from jaxbased import LanguageModel, count_parameters
    from jaxbased.training.flops import flops_per_token
    from jaxbased.training.optimizer import make_optimizer
    from jaxbased.training.state import TrainState
    from jaxbased.training.steps import make_train_step

    config = model_config(name)
    model = LanguageModel(config)
    params = nn.meta.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
    )
    schedule = optax.constant_schedule(3e-4)
    optimizer = make_optimizer(schedule)
    step = make_train_step(model, optimizer, schedule)
    state = TrainState.create(params, optimizer)
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, config.vocab_size, (batch_size, seq_len + 1)), jnp.int32)
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = batch_size * seq_len
    analytical = flops_per_token(config, seq_len)
    return {
        "model": name,
        "parameters": count_parameters(params),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "step_seconds_median": seconds,
        "step_seconds": times,
        "tokens_per_second": tokens / seconds,
        "analytical_flops_per_token": analytical,
        "xla_flops_per_token": xla_flops / tokens,
        "mfu": analytical["total"] * tokens / seconds / peak,
    }


def main(argv: Sequence[str]) -> None:
    del argv
    seq_len, steps, output = FLAGS.seq_len, FLAGS.steps, FLAGS.output
    if FLAGS.quick:
        seq_len, steps, output = 256, 2, "/tmp/train_throughput_quick.json"
    peak = matmul_peak()
    rows = [measure(name, seq_len, FLAGS.batch_size, steps, peak) for name in FLAGS.models]
    print(f"\nfloat32 matmul peak (2048^2, best of 7): {peak / 1e9:.0f} GFLOP/s\n")
    print(
        "| model | parameters | tokens/s | step (s) | train FLOPs/token (analytical) "
        "| XLA FLOPs/token | MFU |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {MODEL_TITLES[row['model']]} | {row['parameters'] / 1e6:.2f}M "
            f"| {row['tokens_per_second']:,.0f} | {row['step_seconds_median']:.3f} "
            f"| {row['analytical_flops_per_token']['total'] / 1e6:.1f}M "
            f"| {row['xla_flops_per_token'] / 1e6:.1f}M | {row['mfu']:.1%} |"
        )
    write_json_atomic(
        output,
        {"machine": machine_info(), "matmul_peak_flops": peak, "seq_len": seq_len, "rows": rows},
    )
    print(f"\nJSON: {output}")


if __name__ == "__main__":
    app.run(main)
