"""CCA-Attention against full attention: decode-cache size (here) and forward time and memory
(``benchmarks/scaling.py``), on the models of ``benchmarks/common.py``: the d 256, 10-layer
Transformer++ and the same model with CCA-Attention layers (groups of 16, local window 256,
docs/mixers/cca_attention.md).

The cache sizes are computed from shapes (``jaxbased.generation.decode_cache_bytes``): no
timing, seconds to run. The forward comparison is a timing run of ``scaling.py``:

    python benchmarks/cca_attention.py                        # cache bytes, table + JSON
    python benchmarks/scaling.py --models=transformer,cca --seq_lens=8192,12288,16384 \\
        --reference_seq_len=8192 --output=benchmarks/results/cca_scaling.json

The second takes tens of minutes on 2 idle cores (full attention at 16k dominates); run it on
an otherwise idle machine (it waits for one and records the others' share of the CPUs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MODEL_TITLES, machine_info, model_config, write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["8192", "16384"], "Tokens the cache must hold (batch 1).")
flags.DEFINE_string(
    "output", "benchmarks/results/cca_cache.json", "Where the JSON results go ('' for none)."
)

MODELS = ("transformer", "cca")
MIB = 2**20


def cache_rows(lengths: Sequence[int]) -> list[dict]:
    """Bytes of one sequence's decode cache for each model and length, and CCA's share."""
    from jaxbased import LanguageModel
    from jaxbased.generation import decode_cache_bytes

    rows = []
    for length in lengths:
        sizes = {
            name: decode_cache_bytes(LanguageModel(model_config(name)), 1, length)
            for name in MODELS
        }
        rows.append(
            {"length": length, **sizes, "cca_fraction": sizes["cca"] / sizes["transformer"]}
        )
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["tokens"] + [f"{MODEL_TITLES[name]} cache MiB" for name in MODELS] + ["CCA / full"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in rows:
        cells = [str(row["length"])] + [f"{row[name] / MIB:.2f}" for name in MODELS]
        lines.append("| " + " | ".join([*cells, f"{row['cca_fraction']:.1%}"]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    rows = cache_rows([int(length) for length in FLAGS.lengths])
    print(markdown(rows))
    if FLAGS.output:
        configs = {name: model_config(name).to_dict() for name in MODELS}
        payload = {"machine": machine_info(), "configs": configs, "rows": rows}
        write_json_atomic(FLAGS.output, payload)


if __name__ == "__main__":
    app.run(main)
