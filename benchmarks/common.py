"""Helpers shared by the benchmark scripts: machine description, atomic JSON output, and the
pair of equal-size BASED / Transformer++ models the CPU benchmarks compare."""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from typing import Any

VOCAB_SIZE = 256
D_MODEL = 256
BASED_LAYERS = 12
TRANSFORMER_LAYERS = 10
MODEL_TITLES = {"based": "BASED", "transformer": "Transformer++", "cca": "CCA"}
#: Group size and local window of the ``cca`` model's CCA-Attention layers.
CCA_GROUP_SIZE, CCA_LOCAL_WINDOW = 16, 256


def model_config(name: str):
    """``based``: d 256, 12 layers in the released pattern (linear attention at 1, 6, 11, window
    at 2, 7, BaseConv elsewhere), F = 16, window 129. ``transformer``: d 256, 10 full-attention
    layers, rotary on half of each head, SwiGLU 768. Both about 8.6M parameters, vocab 256.
    ``cca``: the Transformer++ with CCA-Attention (groups of 16, local window 256) in place of its
    attention layers: the same parameters (docs/mixers/cca_attention.md)."""
    from jaxbased import ModelConfig, based_layer_pattern

    if name == "based":
        return ModelConfig(
            vocab_size=VOCAB_SIZE,
            d_model=D_MODEL,
            num_layers=BASED_LAYERS,
            layer_pattern=based_layer_pattern(
                BASED_LAYERS, range(1, BASED_LAYERS, 5), range(2, BASED_LAYERS, 5)
            ),
            mlp={"inner_dim": 2 * D_MODEL},
            based={"heads": 4, "feature_dim": 16},
            sliding_window={"heads": 4, "window": 129},
        )
    if name == "transformer":
        return ModelConfig(
            vocab_size=VOCAB_SIZE,
            pad_vocab_size_multiple=16,
            d_model=D_MODEL,
            num_layers=TRANSFORMER_LAYERS,
            layer_pattern=("attention",) * TRANSFORMER_LAYERS,
            mlp={"inner_dim": None},
            attention={"heads": 4, "rotary_fraction": 0.5},
        )
    if name == "cca":
        transformer = model_config("transformer")
        return transformer.replace(
            layer_pattern=("cca_attention",) * TRANSFORMER_LAYERS,
            cca_attention={
                **transformer.attention.to_dict(),
                "group_size": CCA_GROUP_SIZE,
                "local_window": CCA_LOCAL_WINDOW,
            },
        )
    raise ValueError(f"model={name!r} is not known; allowed: {sorted(MODEL_TITLES)}")


def machine_info() -> dict[str, Any]:
    """Platform, CPU model and count, memory, library versions and the date."""
    import jax

    cpu_model = platform.processor() or None
    memory_total = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory_total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": memory_total,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "load_average": os.getloadavg(),
    }


def write_json_atomic(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".bench-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
