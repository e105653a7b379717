"""Sequence parallelism on 8 simulated CPU devices: memory, the longest trainable length, bytes.

Everything here is read from compiled train steps (``jax.jit(...).lower(...).compile()``), as
``train`` builds them for a ``(data, fsdp, tensor, sequence)`` mesh, with abstract inputs:
nothing is allocated, and XLA's memory and HLO are deterministic for a jax version and shapes,
so a loaded CPU is fine (only the wall times vary).

(a) ``memory``: per-device temp bytes (``memory_analysis().temp_size_in_bytes``) of the train
    step vs ``sequence`` in 1, 2, 4, 8 at a fixed global length, for a model of BASED linear
    attention layers only and for the BASED mix (base_conv, based, sliding_window), with
    ``n x temp(n) / temp(1)`` (1.0 would be an exact 1/n), and for the mix ``jaxbased-plan``'s
    one-device estimate for the same mesh.
(b) ``longest``: the longest sequence whose train step fits a per-device cap (``--cap_mib``;
    temp + arguments + outputs - aliased donations), ``sequence`` = 1 vs 8: lengths double until
    one does not fit, then ``--bisections`` bisection steps on multiples of
    ``sequence x chunk_size``.
(c) ``bytes``: the collective-permute bytes of every layer of the mix, read from the HLO of
    (a)'s compiled steps (``jaxbased.hlo_traffic``; forward and backward), against
    docs/sequence_parallelism.md's formula (forward; the backward sends as much back).

Usage (repository root)::

    python benchmarks/sequence_parallel.py   # writes benchmarks/results/sequence_parallel.json
    python benchmarks/sequence_parallel.py --parts memory --output /tmp/memory.json  # (a), (c)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":  # before JAX starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: d_model 128, 4 heads of 32 channels, the Taylor map of feature_dim 16 (D' = 273).
BASED_LAYER = dict(heads=4, feature_dim=16, chunk_size=64)
MODELS = {
    "based_only": dict(
        vocab_size=256,
        d_model=128,
        num_layers=2,
        layer_pattern=("based", "based"),
        based=BASED_LAYER,
        mlp=dict(inner_dim=256),
    ),
    "based_mix": dict(
        vocab_size=256,
        d_model=128,
        num_layers=3,
        layer_pattern=("base_conv", "based", "sliding_window"),
        based=BASED_LAYER,
        sliding_window=dict(heads=4, window=64),
        mlp=dict(inner_dim=256),
    ),
}
SEQUENCE_SIZES = (1, 2, 4, 8)


def compile_step(fields: dict, mesh: tuple[int, ...], *, seq_len: int, batch_size: int):
    """The compiled train step of the model ``fields`` on ``mesh`` (data, fsdp, tensor,
    sequence)."""
    import optax

    from jaxbased import LanguageModel, ModelConfig
    from jaxbased.planning import compile_sharded_step
    from jaxbased.sharding import MESH_AXES
    from jaxbased.training.optimizer import make_optimizer

    schedule = optax.constant_schedule(1e-3)
    return compile_sharded_step(
        LanguageModel(ModelConfig.from_dict(fields)),
        make_optimizer(schedule),
        schedule,
        dict(zip(MESH_AXES, mesh, strict=True)),
        seq_len=seq_len,
        batch_size=batch_size,
    )


def device_bytes(analysis) -> int:
    """What one device holds during the step: arguments, outputs and temporaries, less the
    outputs that reuse donated arguments."""
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def formula_bytes(fields: dict, mixer: str, *, rows: int, shards: int) -> int:
    """Forward bytes one device sends for a layer, by docs/sequence_parallelism.md's table."""
    from jaxbased import ModelConfig
    from jaxbased.ops.sequence_parallel import exclusive_prefix_rounds

    config = ModelConfig.from_dict(fields)
    if mixer == "based":
        heads, feature = config.based.heads, config.based.feature_dim
        features = 1 + feature + feature**2
        value = config.d_model // heads
        return exclusive_prefix_rounds(shards) * rows * heads * features * (value + 1) * 4
    if mixer == "sliding_window":
        heads = config.sliding_window.heads
        head_dim = config.d_model // heads
        return rows * (config.sliding_window.window - 1) * heads * (head_dim + head_dim) * 4
    if mixer == "base_conv":
        channels = 2 * config.d_model  # the conv runs on the doubled input projection
        return rows * (config.base_conv.kernel_size - 1) * channels * 4
    return 0


def layer_bytes(fields: dict, hlo: str, mesh: tuple[int, ...], batch_size: int) -> dict:
    """(c): collective-permute bytes per layer from the HLO vs the formula."""
    from jaxbased.hlo_traffic import collective_bytes

    measured = collective_bytes(hlo)
    rows = batch_size // (mesh[0] * mesh[1])
    layers = {}
    for index, mixer in enumerate(fields["layer_pattern"]):
        hlo_bytes = measured["permutes_by_layer"].get(f"layers_{index}", 0)
        formula = formula_bytes(fields, mixer, rows=rows, shards=mesh[3])
        layers[f"layers_{index} ({mixer})"] = {
            "hlo_forward_and_backward": hlo_bytes,
            "formula_forward": formula,
            "hlo_over_twice_formula": round(hlo_bytes / (2 * formula), 4) if formula else None,
        }
    return {
        "layers": layers,
        "other_permutes_bytes": measured["other_permutes"],
        "all_reduce_bytes": measured["by_kind"]["all-reduce"],
    }


def memory_sweep(seq_len: int, batch_size: int) -> tuple[dict, dict]:
    """(a) temp bytes vs sequence size (and the planner's one-device estimate for the mix), and
    (c) the mix's bytes per layer on the sequence meshes."""
    from jaxbased import ModelConfig
    from jaxbased.planning import plan_memory

    results, traffic = {}, {}
    for name, fields in MODELS.items():
        rows = {}
        for shards in SEQUENCE_SIZES:
            mesh = (1, 1, 1, shards)
            start = time.perf_counter()
            compiled = compile_step(fields, mesh, seq_len=seq_len, batch_size=batch_size)
            row = {"temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}
            if name == "based_mix":
                row["planner_estimate_bytes"] = plan_memory(
                    ModelConfig.from_dict(fields),
                    mesh,
                    seq_len=seq_len,
                    batch_size=batch_size,
                    on_mesh=False,
                ).activations
                row["planner_over_compiled"] = round(
                    row["planner_estimate_bytes"] / row["temp_bytes"], 3
                )
                if shards > 1:
                    traffic["x".join(map(str, mesh))] = layer_bytes(
                        fields, compiled.as_text(), mesh, batch_size
                    )
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows[str(shards)] = row
            print(name, shards, row, flush=True)
        one = rows["1"]["temp_bytes"]
        for shards in SEQUENCE_SIZES:
            row = rows[str(shards)]
            row["n_times_fraction_of_one"] = round(shards * row["temp_bytes"] / one, 3)
        results[name] = rows
    return results, traffic


def fits(fields: dict, shards: int, seq_len: int, batch_size: int, cap: int) -> tuple[bool, int]:
    compiled = compile_step(fields, (1, 1, 1, shards), seq_len=seq_len, batch_size=batch_size)
    held = device_bytes(compiled.memory_analysis())
    return held <= cap, held


def longest_sequence(
    fields: dict, shards: int, *, batch_size: int, cap: int, start: int, bisections: int
) -> dict:
    """(b): the longest multiple of ``shards x chunk_size`` whose step fits ``cap`` bytes,
    found by doubling from ``start`` and ``bisections`` bisection steps."""
    step = shards * fields["based"]["chunk_size"]
    tried = {}
    length = max(step, start - start % step)
    good, bad = 0, None
    while bad is None:
        ok, held = fits(fields, shards, length, batch_size, cap)
        tried[length] = held
        print("longest", shards, length, round(held / 2**20, 1), ok, flush=True)
        if ok:
            good, length = length, length * 2
        elif good == 0 and length > step:
            length = max(step, length // 2 // step * step)  # the start did not fit: halve
            bad = None if length not in tried else length
        else:
            bad = length
    for _ in range(bisections):
        middle = (good + bad) // 2 // step * step
        if middle <= good:
            break
        ok, held = fits(fields, shards, middle, batch_size, cap)
        tried[middle] = held
        print("longest", shards, middle, round(held / 2**20, 1), ok, flush=True)
        good, bad = (middle, bad) if ok else (good, middle)
    return {
        "longest_fitting": good,
        "first_not_fitting": min(length for length in tried if length > good),
        "bytes_by_length": {str(k): v for k, v in sorted(tried.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, default=2048, help="(a), (c): global length")
    parser.add_argument("--batch_size", type=int, default=2, help="sequences per step")
    parser.add_argument("--cap_mib", type=int, default=256, help="(b): per-device memory cap")
    parser.add_argument("--bisections", type=int, default=1, help="(b): bisection steps")
    parser.add_argument(
        "--parts",
        default="memory,longest",
        help="comma-separated: memory ((a) and (c)), longest ((b))",
    )
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results", "sequence_parallel.json"),
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts or not parts <= {"memory", "longest"}:
        raise ValueError(f"--parts={args.parts!r}; allowed: memory, longest, or both")

    import jax

    from benchmarks.common import machine_info, write_json_atomic

    if jax.device_count() < 8:
        raise ValueError(f"needs 8 devices (simulated on CPU); found {jax.device_count()}")
    started = time.perf_counter()
    payload = {
        "machine": machine_info(),
        "models": MODELS,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    if "memory" in parts:
        payload["memory"], payload["bytes"] = memory_sweep(args.seq_len, args.batch_size)
    if "longest" in parts:
        payload["longest"] = longest_sweep(args.cap_mib, args.bisections)
    payload["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(args.output, payload)
    print(f"wrote {args.output} in {payload['seconds']} s")


def longest_sweep(cap_mib: int, bisections: int) -> dict:
    """(b) for the BASED mix, ``sequence`` = 1 and 8, under ``cap_mib`` MiB per device."""
    cap = cap_mib * 2**20
    return {
        "cap_mib": cap_mib,
        "model": "based_mix",
        "batch_size": 1,
        **{
            f"sequence_{shards}": longest_sequence(
                MODELS["based_mix"],
                shards,
                batch_size=1,
                cap=cap,
                start=start,
                bisections=bisections,
            )
            for shards, start in ((1, 4096), (8, 32768))
        },
    }


if __name__ == "__main__":
    main()
