"""Shared helpers for the tests, and a compilation cache shared by every test process."""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig


def compilation_cache_dir() -> pathlib.Path:
    """A folder of compiled XLA programs for this machine's CPU: many tests compile the same
    train step of the same tiny model (in this process, in xdist's other worker and in the
    ``train.py`` subprocesses), and each compile takes seconds. Keyed by the CPU's feature flags,
    so code compiled for one instruction set is never loaded on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        pass
    key = hashlib.sha256(f"{jax.__version__} {flags}".encode()).hexdigest()[:16]
    return pathlib.Path(tempfile.gettempdir()) / f"jaxbased-tests-xla-cache-{key}"


def pytest_configure(config) -> None:
    """Turn on JAX's persistent compilation cache for this process and, through the
    environment, for every subprocess a test starts. Every program is cached, however fast its
    compile; the cache changes how long a compile takes, never what it computes."""
    del config
    settings = {
        "jax_compilation_cache_dir": str(compilation_cache_dir()),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def init_model(config: ModelConfig, seed: int = 0, seq: int = 4):
    """The model and its unboxed float32 parameters."""
    model = LanguageModel(config)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, seq), jnp.int32))
    return model, nn.meta.unbox(variables["params"])


def sgd_losses(model, params, tokens, learning_rate: float, steps: int) -> list[float]:
    """Next-token cross-entropy of ``steps`` jitted SGD steps of ``model`` on ``tokens``
    ``[B, T + 1]`` (int32), the loss before each update: two implementations of a model train
    alike when these match."""
    import optax

    def loss_fn(params):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:]
        ).mean()

    optimizer = optax.sgd(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


def compiled_decode_step(model, params, batch: int, **prefill_options):
    """The compiled HLO text of ``generate``'s sampling decode step (32 new tokens) after a
    prefill of ``batch`` rows of 16 tokens (lengths 5 and 16) into a 48-token cache, and that
    cache: for tests that look for cache-sized copies in the step."""
    from jaxbased.generation import _DecodeMode, _programs_for

    programs = _programs_for(model)
    logits, cache = programs.prefill(
        params,
        jnp.zeros((batch, 16), jnp.int32),
        jnp.array([5, 16][:batch], jnp.int32),
        max_len=48,
        **prefill_options,
    )
    lowered = programs.decode.lower(
        params,
        cache,
        logits,
        jax.random.key(0),
        jnp.float32(1),
        jnp.float32(1),
        jnp.zeros((model.config.padded_vocab_size,), bool),
        jnp.int32(-1),
        mode=_DecodeMode(32, True, 0, False, False),
    )
    return lowered.compile().as_text(), cache


def worker_report(worker: str, *arguments: str, timeout: int = 900) -> dict:
    """Run ``tests/<worker>.py`` (an 8-simulated-device script) in a fresh Python with
    ``arguments`` and return the JSON it prints on its ``RESULT `` line; fails with the
    worker's stderr when it exits non-zero."""
    import json
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(repo / "tests" / f"{worker}.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=repo,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


#: The kernel family this machine runs compiled: ``tpu`` on a TPU, ``gpu`` on a CUDA/ROCm GPU,
#: none on CPU.
NATIVE_KERNEL_BACKEND = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(
    jax.default_backend()
)


def kernel_interpret(backend: str) -> bool:
    """``interpret=`` for a kernel test of ``backend``: compiled (False) where this machine has
    that accelerator, so that the suite on a GPU/TPU host is the hardware check; interpreted
    (True) everywhere else."""
    return backend != NATIVE_KERNEL_BACKEND


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def fine_tune_two_steps(run_config, workdir):
    """Train ``run_config`` for two small steps in ``workdir`` (sequences of 16, batch 2; no
    evaluation, TensorBoard or asynchronous checkpoint): a converted checkpoint's resume check."""
    from jaxbased.training.loop import train

    run_config.data.update(seq_len=16, batch_size=2, prefetch_threads=1)
    run_config.train.update(
        num_steps=2,
        warmup_steps=1,
        log_every=1,
        eval_every=100,
        eval_batches=1,
        checkpoint_every=100,
        async_checkpoints=False,
        tensorboard=False,
        peak_flops=1e12,
    )
    return train(run_config, workdir)


def model_flags(values: dict, prefix: str = "--config.model.") -> list[str]:
    """``--config.model.FIELD=VALUE`` flags for model overrides, a section's fields as
    ``--config.model.SECTION.FIELD=VALUE`` (``layer_pattern`` is left to the caller)."""
    flags = []
    for key, value in values.items():
        if isinstance(value, dict):
            flags += model_flags(value, f"{prefix}{key}.")
        elif key != "layer_pattern":
            flags.append(f"{prefix}{key}={value}")
    return flags
