"""MQAR side by side: transformers' ``MambaForCausalLM`` (PyTorch) against jaxbased's Mamba.

The model is the 2-layer Mamba MQAR model of the BASED paper's sweep: token embedding, two
pre-norm blocks of RMSNorm then a Mamba mixer (no MLP, no BaseConv), a final RMSNorm and the
tied head; d_model 64, state dim 16, expand 2, conv 4 by default. Every run trains on the same
batches of one MQAR setting (``jaxbased.data.mqar.multiquery_ar``) with the same optimizer:
AdamW (betas 0.9 / 0.999, eps 1e-8, decoupled weight decay on every parameter, or on every
parameter but ``A_log``, ``D`` and the time-step bias with ``--spare_state_space``), cosine decay
to 0 over the run, no warmup, no clipping, cross-entropy at the answer positions only. Runs:

- ``torch``: ``MambaForCausalLM`` with transformers' initialisation;
- ``jax_torch_init``: jaxbased's model started from exactly those initial weights (exported from
  PyTorch, imported with ``jaxbased.interop.mamba_checkpoint``): the two curves separate the
  model and optimizer (which should then agree up to float32 drift) from everything else;
- ``jax``: jaxbased's model with its own initialisation (``init_params``);
- ``jax_zoology_init``: jaxbased's model with Zoology's re-initialisation
  (``jaxbased.mqar.models.zoology_reinit``: every linear weight normal(0.02), every bias 0, the
  time-step bias included, output projections normal(0.02 / sqrt(2 * layers))).

The JSON holds each run's curve (train loss, test loss, test accuracy every ``--eval_every``
steps) and the settings; a markdown table of the final numbers is printed.

    .venv/bin/python benchmarks/mqar_mamba_torch.py --steps=500 \\
        --output=benchmarks/results/mqar_mamba_torch.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Any

# This folder holds a ``kernels.py`` that would shadow the ``kernels`` package transformers imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [path for path in sys.path if os.path.abspath(path or ".") != _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxbased.data.mqar import MQARSegment, multiquery_ar  # noqa: E402
from jaxbased.interop.mamba_checkpoint import (  # noqa: E402
    import_mamba_state_dict,
    mamba_config_from_reference,
)
from jaxbased.model import LanguageModel  # noqa: E402
from jaxbased.mqar.models import init_params, zoology_reinit  # noqa: E402
from jaxbased.training.optimizer import state_space_decay_mask  # noqa: E402

VOCAB = 8192
RUNS = ("torch", "jax_torch_init", "jax", "jax_zoology_init")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--num_pairs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--spare_state_space", action="store_true")
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--state_dim", type=int, default=16)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--test_examples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma list from {RUNS}")
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    args.runs = tuple(name for name in args.runs.split(",") if name)
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown:
        parser.error(f"--runs has unknown names {unknown}; allowed: {RUNS}")
    return args


def cosine(step: int, total: int, peak: float) -> float:
    """The learning rate at ``step`` (0-based) of ``total``: ``peak * (1 + cos(pi s / T)) / 2``."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(step, total) / total))


def torch_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(args.seed)
    config = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=args.d_model,
        state_size=args.state_dim,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        use_mambapy=True,
        tie_word_embeddings=True,
    )
    return MambaForCausalLM(config)


def jax_config(args: argparse.Namespace) -> Any:
    """The same model in jaxbased (mamba_ssm's config fields; HF's norm epsilon 1e-5)."""
    return mamba_config_from_reference(
        dict(
            d_model=args.d_model,
            n_layer=2,
            vocab_size=VOCAB,
            pad_vocab_size_multiple=1,
            rms_norm=True,
            norm_epsilon=1e-5,
            ssm_cfg=dict(d_state=args.state_dim, expand=2, d_conv=4),
        ),
        mamba={"scan_algorithm": "sequential"},
    )


def torch_initial_params(model: Any, config: Any) -> Any:
    """jaxbased parameters equal to ``model``'s (HF names ``backbone.embeddings``; mamba_ssm's
    layout, which the importer reads, names it ``backbone.embedding``)."""
    state = {
        key.replace("backbone.embeddings.", "backbone.embedding."): value.detach().numpy()
        for key, value in model.state_dict().items()
    }
    params, _ = import_mamba_state_dict(state, config)
    return jax.tree_util.tree_map(jnp.asarray, params)


def train_torch(
    model: Any, args: argparse.Namespace, train: MQARSegment, test: MQARSegment
) -> list[dict[str, Any]]:
    import torch

    spared = ("A_log", "D")
    no_decay = [
        parameter
        for name, parameter in model.named_parameters()
        if args.spare_state_space
        and (name.split(".")[-1] in spared or name.endswith("dt_proj.bias"))
    ]
    spared_ids = {id(parameter) for parameter in no_decay}
    decay = [parameter for parameter in model.parameters() if id(parameter) not in spared_ids]
    optimizer = torch.optim.AdamW(
        [
            dict(params=decay, weight_decay=args.weight_decay),
            dict(params=no_decay, weight_decay=0.0),
        ],
        lr=args.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
    )

    def answer_logits(inputs: np.ndarray, positions: np.ndarray) -> Any:
        logits = model(torch.from_numpy(inputs.astype(np.int64))).logits
        index = torch.from_numpy(positions.astype(np.int64))
        return logits[torch.arange(len(inputs))[:, None], index]

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = answer_logits(test.inputs, test.answer_positions)
            answers = torch.from_numpy(test.answers.astype(np.int64))
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), answers.ravel())
            accuracy = (logits.argmax(-1) == answers).float().mean()
        model.train()
        return float(loss), float(accuracy)

    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine(step, args.steps, args.learning_rate)
        rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
        logits = answer_logits(train.inputs[rows], train.answer_positions[rows])
        answers = torch.from_numpy(train.answers[rows].astype(np.int64))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), answers.ravel())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            test_loss, accuracy = evaluate()
            history.append(
                _point(step + 1, float(loss), test_loss, accuracy, time.perf_counter() - start)
            )
            _report("torch", history[-1])
    return history


def train_jax(
    name: str,
    params: Any,
    config: Any,
    args: argparse.Namespace,
    train: MQARSegment,
    test: MQARSegment,
) -> list[dict[str, Any]]:
    model = LanguageModel(config)
    optimizer = optax.adamw(
        lambda step: 0.5 * args.learning_rate * (1 + jnp.cos(jnp.pi * step / args.steps)),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=args.weight_decay,
        mask=state_space_decay_mask if args.spare_state_space else None,
    )
    opt_state = optimizer.init(params)

    def loss_fn(params: Any, inputs: Any, positions: Any, answers: Any) -> Any:
        logits = model.apply({"params": params}, inputs, positions, method="logits_at")
        logits = logits[..., :VOCAB].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, answers).mean()
        return loss, (logits.argmax(-1) == answers).mean()

    @jax.jit
    def step_fn(params: Any, opt_state: Any, inputs: Any, positions: Any, answers: Any) -> Any:
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, inputs, positions, answers
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(loss_fn)
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    for step in range(args.steps):
        rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
        params, opt_state, loss = step_fn(
            params, opt_state, train.inputs[rows], train.answer_positions[rows], train.answers[rows]
        )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            test_loss, accuracy = evaluate(params, test.inputs, test.answer_positions, test.answers)
            history.append(
                _point(
                    step + 1,
                    float(loss),
                    float(test_loss),
                    float(accuracy),
                    time.perf_counter() - start,
                )
            )
            _report(name, history[-1])
    return history


def _point(step: int, train_loss: float, loss: float, accuracy: float, seconds: float) -> dict:
    return dict(
        step=step,
        train_loss=round(train_loss, 4),
        loss=round(loss, 4),
        accuracy=round(accuracy, 4),
        seconds=round(seconds, 1),
    )


def _report(name: str, point: dict[str, Any]) -> None:
    print(
        f"{name:>16} step {point['step']:5d}: train {point['train_loss']:.3f} "
        f"test {point['loss']:.3f} accuracy {point['accuracy']:.4f} ({point['seconds']:.0f} s)",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    train = multiquery_ar(
        num_examples=args.steps * args.batch_size,
        seq_len=args.seq_len,
        num_pairs=args.num_pairs,
        vocab_size=VOCAB,
        seed=args.seed,
    )
    test = multiquery_ar(
        num_examples=args.test_examples,
        seq_len=args.seq_len,
        num_pairs=args.num_pairs,
        vocab_size=VOCAB,
        seed=args.seed + 1,
    )
    result: dict[str, Any] = dict(
        settings=vars(args),
        machine=f"{platform.machine()} {os.cpu_count()} cores, JAX {jax.__version__}",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        chance_accuracy=1.0 / (VOCAB // 2),
        runs={},
    )
    config = jax_config(args)
    reference = torch_model(args)
    torch_init = torch_initial_params(reference, config)
    for name in args.runs:
        if name == "torch":
            result["runs"][name] = train_torch(reference, args, train, test)
        elif name == "jax_torch_init":
            result["runs"][name] = train_jax(name, torch_init, config, args, train, test)
        elif name == "jax":
            params = init_params(config, args.seed)
            result["runs"][name] = train_jax(name, params, config, args, train, test)
        else:
            params = zoology_reinit(init_params(config, args.seed), config, args.seed)
            result["runs"][name] = train_jax(name, params, config, args, train, test)
        if args.output:
            _write_json(args.output, result)
    print("\n| run | test loss | test accuracy | seconds |\n|---|---|---|---|")
    for name, history in result["runs"].items():
        last = history[-1]
        print(f"| {name} | {last['loss']:.3f} | {last['accuracy']:.4f} | {last['seconds']:.0f} |")


def _write_json(path: str, result: dict[str, Any]) -> None:
    """Write atomically: a partial file never replaces a finished one."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(result, file, indent=1)
    os.replace(temporary, path)


if __name__ == "__main__":
    main()
