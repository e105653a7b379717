"""Training throughput and FLOP utilisation: BASED and Transformer++ of equal size, and the
Llama of HF transformers that a user would train instead.

For each of our models (``benchmarks/common.py``: about 8.6M parameters each, vocab 256) the
script compiles the real train step of ``train.py`` (AdamW, clipping, donated state; batch
``--batch_size`` x ``--seq_len``), runs it once untimed, then times ``--steps`` steps and reports
the median: tokens/s, and model FLOP utilisation = analytical training FLOPs per token
(``jaxbased.training.flops``) x tokens/s / peak, where the peak is a float32 2048 x 2048 matmul
measured in the same run (docs/performance.md). XLA's own FLOP count of the compiled step is
printed beside the analytical one as a cross-check.

``hf_llama`` (when torch and transformers are installed) is ``transformers.LlamaForCausalLM`` of
the Transformer++ model's shapes (d 256, 10 layers, 4 heads, SwiGLU 768, tied embeddings, vocab
256: the same parameter count), trained the usual PyTorch way on ``--torch_threads`` threads:
``torch.optim.AdamW`` (lr 3e-4, betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0,
float32, the same token batch. Its FLOPs per token are taken as Transformer++'s. Every model runs
in its own subprocess, one after the other.

    python benchmarks/train_throughput.py                       # batch 8 x 512: table + JSON
    python benchmarks/train_throughput.py --seq_len=2048 --batch_size=2
    python benchmarks/train_throughput.py --quick               # seconds: T = 256, 2 steps
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MODEL_TITLES, machine_info, model_config, write_json_atomic

flags.DEFINE_integer("seq_len", 512, "Sequence length.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("steps", 5, "Timed steps per model (median reported).")
flags.DEFINE_list(
    "models", ["based", "transformer", "hf_llama"], "Models to run (hf_llama needs transformers)."
)
flags.DEFINE_integer("torch_threads", 2, "Threads of PyTorch for hf_llama.")
flags.DEFINE_string("worker", "", "Internal: measure one model in this process.")
flags.DEFINE_float("peak", 0.0, "Internal: the matmul peak the parent measured.")
flags.DEFINE_enum(
    "host_malloc",
    "keep",
    ["keep", "system"],
    "glibc's treatment of freed blocks in every model's process, PyTorch's included: keep (as "
    "train.py sets it, jaxbased.host_memory) or system (glibc's defaults).",
)
flags.DEFINE_string("output", "benchmarks/results/train_throughput.json", "JSON output path.")
flags.DEFINE_bool("quick", False, "Smoke run: T = 256, 2 steps, output under /tmp.")
FLAGS = flags.FLAGS
TITLES = {**MODEL_TITLES, "hf_llama": "HF Llama (torch)"}


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


def measure_hf_llama(seq_len: int, batch_size: int, steps: int, peak: float) -> dict:
    """``transformers.LlamaForCausalLM`` of the Transformer++ shapes, trained with
    ``torch.optim.AdamW`` and clipping on ``--torch_threads`` threads (see the module docstring)."""
    import numpy as np

    # benchmarks/kernels.py would shadow the ``kernels`` package that transformers imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [path for path in sys.path if os.path.abspath(path or ".") != here]
    import torch
    import transformers

    from jaxbased.training.flops import flops_per_token

    torch.set_num_threads(FLAGS.torch_threads)
    torch.manual_seed(0)
    ours = model_config("transformer")
    config = transformers.LlamaConfig(
        vocab_size=ours.padded_vocab_size,
        hidden_size=ours.d_model,
        intermediate_size=ours.mlp.hidden_dim(ours.d_model),
        num_hidden_layers=ours.num_layers,
        num_attention_heads=ours.attention.heads,
        num_key_value_heads=ours.attention.heads,
        max_position_embeddings=max(seq_len, 2048),
        rms_norm_eps=ours.norm_eps,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, ours.vocab_size, (batch_size, seq_len + 1)))

    def step() -> None:
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_step = batch_size * seq_len
    analytical = flops_per_token(ours, seq_len)
    return {
        "model": "hf_llama",
        "parameters": sum(p.numel() for p in model.parameters()),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "step_seconds_median": seconds,
        "step_seconds": times,
        "tokens_per_second": tokens_per_step / seconds,
        "analytical_flops_per_token": analytical,
        "xla_flops_per_token": float("nan"),
        "mfu": analytical["total"] * tokens_per_step / seconds / peak,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": FLAGS.torch_threads,
        "attention": config._attn_implementation,
    }


def measure_in_subprocess(name: str, seq_len: int, batch_size: int, steps: int, peak: float):
    """One model's row, measured in a fresh process (no other framework's threads or caches);
    None when ``hf_llama``'s packages are missing."""
    if name == "hf_llama" and not all(
        importlib.util.find_spec(package) for package in ("torch", "transformers")
    ):
        print("hf_llama: torch or transformers is not installed; skipped")
        return None
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--worker={name}",
        f"--seq_len={seq_len}",
        f"--batch_size={batch_size}",
        f"--steps={steps}",
        f"--torch_threads={FLAGS.torch_threads}",
        f"--peak={peak}",
        f"--host_malloc={FLAGS.host_malloc}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main(argv: Sequence[str]) -> None:
    del argv
    seq_len, steps, output = FLAGS.seq_len, FLAGS.steps, FLAGS.output
    if FLAGS.quick:
        seq_len, steps, output = 256, 2, "/tmp/train_throughput_quick.json"
    if FLAGS.worker:
        if FLAGS.host_malloc == "keep":
            from jaxbased.host_memory import keep_freed_host_memory

            keep_freed_host_memory()  # before JAX or PyTorch start their threads
        measure_one = measure_hf_llama if FLAGS.worker == "hf_llama" else None
        if measure_one is None:
            row = measure(FLAGS.worker, seq_len, FLAGS.batch_size, steps, FLAGS.peak)
        else:
            row = measure_one(seq_len, FLAGS.batch_size, steps, FLAGS.peak)
        print("RESULT " + json.dumps(row))
        return
    peak = matmul_peak()
    rows = [
        row
        for name in FLAGS.models
        if (row := measure_in_subprocess(name, seq_len, FLAGS.batch_size, steps, peak))
    ]
    print(f"\nfloat32 matmul peak (2048^2, best of 7): {peak / 1e9:.0f} GFLOP/s\n")
    print(
        "| model | parameters | tokens/s | step (s) | train FLOPs/token (analytical) "
        "| XLA FLOPs/token | MFU |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {TITLES[row['model']]} | {row['parameters'] / 1e6:.2f}M "
            f"| {row['tokens_per_second']:,.0f} | {row['step_seconds_median']:.3f} "
            f"| {row['analytical_flops_per_token']['total'] / 1e6:.1f}M "
            f"| {row['xla_flops_per_token'] / 1e6:.1f}M | {row['mfu']:.1%} |"
        )
    if "hf_llama" in {row["model"] for row in rows}:
        llama = next(row for row in rows if row["model"] == "hf_llama")["tokens_per_second"]
        print()
        for row in rows:
            print(f"{TITLES[row['model']]}: {row['tokens_per_second'] / llama:.2f}x HF Llama")
    write_json_atomic(
        output,
        {
            "machine": machine_info(),
            "matmul_peak_flops": peak,
            "seq_len": seq_len,
            "batch_size": FLAGS.batch_size,
            "host_malloc": FLAGS.host_malloc,
            "rows": rows,
        },
    )
    print(f"\nJSON: {output}")


if __name__ == "__main__":
    app.run(main)
