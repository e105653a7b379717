"""EchoAtt tools (docs/echoatt.md): how alike the layers' attention maps are, which layers to
share, the heat map, and a sharing student's parameters from its teacher's.

The similarity of full-attention layers ``l`` and ``m`` on a set of sequences is

    S[l, m] = mean over sequences b and heads h of  cos(P_l[b, h], P_m[b, h])

where ``P_l[b, h]`` is layer ``l``'s ``T x T`` causal softmax matrix, flattened, and
``cos(u, w) = u·w / (|u| |w|)``. Layer ``l``'s score is its mean similarity to the other layers,
``s_l = mean_{m != l} S[l, m]``. The **largest-gap rule** sorts the scores, cuts at the largest
gap between consecutive sorted scores, keeps the layers below the cut (the distinct ones) and
proposes the layers above it to share (:func:`largest_gap_split`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layer_layout import convert_layout
from jaxbased.model import LanguageModel


def unrolled(config: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """``config`` with ``scan_layers=False`` and ``params`` in that (unrolled) layout."""
    if not config.scan_layers:
        return config, params
    config = config.replace(scan_layers=False)
    return config, convert_layout(params, config)


def similarity_sums(
    maps: Sequence[Float[Array, "B H T T"]],
) -> tuple[Float[Array, "L L"], Int[Array, ""]]:
    """``(sum over b, h of cos(P_l[b, h], P_m[b, h]), B * H)`` for the maps of ``L`` layers;
    float32 (``[L, L]``, and the int32 count)."""
    stacked = jnp.stack([jnp.asarray(p, jnp.float32) for p in maps])  # [L, B, H, T, T]
    layers, batch, heads = stacked.shape[:3]
    flat = stacked.reshape(layers, batch * heads, -1)
    norms = jnp.sqrt(jnp.sum(flat * flat, axis=-1, keepdims=True))
    unit = flat / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)
    return jnp.einsum("lrn,mrn->lm", unit, unit), jnp.asarray(batch * heads, jnp.int32)


def attention_similarity(
    model: LanguageModel, params: Any, batches: Iterable[Int[np.ndarray, "B T"]]
) -> Float[np.ndarray, "L L"]:
    """``S`` (module docstring) over every row of ``batches``, float64 ``[L, L]``, ``L`` =
    ``len(config.attention_map_layers)``. The model must be unrolled (see :func:`unrolled`)."""
    config = model.config
    if len(config.attention_map_layers) < 2:
        raise ValueError(
            f"attention similarity needs at least 2 full-attention layers; the model has "
            f"{len(config.attention_map_layers)}"
        )

    @jax.jit
    def sums(params: Any, tokens: Array) -> tuple[Array, Array]:
        maps = model.apply({"params": params}, tokens, method="attention_probabilities")
        return similarity_sums(maps)

    total = np.zeros((len(config.attention_map_layers),) * 2, np.float64)
    count = 0
    for tokens in batches:
        batch_sum, batch_count = sums(params, jnp.asarray(tokens, jnp.int32))
        total += np.asarray(batch_sum, np.float64)
        count += int(batch_count)
    if count == 0:
        raise ValueError("no sequences to measure the attention similarity on")
    return total / count


def mean_similarity(similarity: Float[np.ndarray, "L L"]) -> Float[np.ndarray, " L"]:
    """Each layer's mean similarity to the other layers: ``s_l = mean_{m != l} S[l, m]``."""
    similarity = np.asarray(similarity, np.float64)
    layers = similarity.shape[0]
    off_diagonal = ~np.eye(layers, dtype=bool)
    return (similarity * off_diagonal).sum(1) / (layers - 1)


def largest_gap_split(scores: Sequence[float]) -> tuple[list[int], list[int], float]:
    """The largest-gap rule on per-layer ``scores`` (positions ``0 .. L-1``): sort ascending,
    find the largest difference between consecutive sorted scores, and split there.

    Returns ``(kept, shared, threshold)``: positions below the cut (the distinct layers),
    positions above it (proposed to share), both ascending, and the midpoint of the gap.
    Ties in the gap go to the first (lowest) largest gap.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or len(scores) < 2:
        raise ValueError(f"scores must hold at least 2 values; got {scores.shape}")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    cut = int(np.argmax(np.diff(sorted_scores)))  # the gap between cut and cut + 1
    threshold = float((sorted_scores[cut] + sorted_scores[cut + 1]) / 2)
    return sorted(order[: cut + 1].tolist()), sorted(order[cut + 1 :].tolist()), threshold


def valid_sharing(config: ModelConfig, candidates: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """``attention_sharing`` pairs for sharing the layers ``candidates`` of ``config``, with
    default anchors; a candidate that cannot share (the first full-attention layer, or one with
    no earlier non-sharing full-attention layer) is left unshared."""
    chosen: list[int] = []
    for layer in sorted(set(candidates)):
        earlier = [
            other for other in config.attention_map_layers if other < layer and other not in chosen
        ]
        if layer != 0 and earlier:
            chosen.append(layer)
    unshared = config.replace(scan_layers=False, attention_sharing=())
    return unshared.replace(attention_sharing=chosen).attention_sharing


def most_similar_layers(
    config: ModelConfig, similarity: Float[np.ndarray, "L L"], count: int
) -> tuple[tuple[int, int], ...]:
    """``attention_sharing`` for the ``count`` full-attention layers with the highest mean
    similarity (the first full-attention layer never shares; fewer when not enough can)."""
    layers = config.attention_map_layers
    scores = mean_similarity(similarity)
    ranked = [layers[i] for i in np.argsort(-scores, kind="stable") if layers[i] != layers[0]]
    return valid_sharing(config, ranked[: max(0, count)])


@dataclasses.dataclass(frozen=True)
class SimilarityReport:
    """What ``jaxbased-attention-similarity`` writes (JSON via :meth:`to_dict`).

    Attributes:
      layers: the full-attention layers, the rows and columns of ``similarity``.
      similarity: ``S[l, m]`` (module docstring), ``[L, L]``.
      mean_similarity: ``s_l``, each layer's mean similarity to the others.
      threshold: the midpoint of the largest gap between sorted scores.
      kept: the layers below the cut (distinct; they keep their attention).
      proposed: the layers above the cut.
      attention_sharing: the proposal as ``ModelConfig.attention_sharing`` pairs (a proposed
        layer that cannot share, such as the first attention layer, is left out).
      sequences: rows measured; seq_len: tokens per row.
    """

    layers: tuple[int, ...]
    similarity: np.ndarray
    mean_similarity: np.ndarray
    threshold: float
    kept: tuple[int, ...]
    proposed: tuple[int, ...]
    attention_sharing: tuple[tuple[int, int], ...]
    sequences: int
    seq_len: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "similarity": np.asarray(self.similarity).round(6).tolist(),
            "mean_similarity": np.asarray(self.mean_similarity).round(6).tolist(),
            "threshold": round(self.threshold, 6),
            "kept": list(self.kept),
            "proposed": list(self.proposed),
            "attention_sharing": [list(pair) for pair in self.attention_sharing],
            "sequences": self.sequences,
            "seq_len": self.seq_len,
        }


def similarity_report(
    config: ModelConfig, similarity: Float[np.ndarray, "L L"], sequences: int, seq_len: int
) -> SimilarityReport:
    """The scores, the largest-gap split and the sharing it proposes, for ``similarity`` of
    ``config.attention_map_layers``."""
    layers = config.attention_map_layers
    scores = mean_similarity(similarity)
    kept, proposed, threshold = largest_gap_split(scores)
    proposed_layers = tuple(layers[i] for i in proposed)
    return SimilarityReport(
        layers=layers,
        similarity=np.asarray(similarity, np.float64),
        mean_similarity=scores,
        threshold=threshold,
        kept=tuple(layers[i] for i in kept),
        proposed=proposed_layers,
        attention_sharing=valid_sharing(config, proposed_layers),
        sequences=sequences,
        seq_len=seq_len,
    )


def plot_similarity(
    similarity: Float[np.ndarray, "L L"],
    layers: Sequence[int],
    path: str | os.PathLike,
    *,
    title: str = "attention-map cosine similarity",
) -> pathlib.Path:
    """Draw the heat map of ``similarity`` (rows and columns labelled by ``layers``) to
    ``path`` (PNG, or a format matplotlib infers from the suffix); returns the path."""
    # A bare Figure draws with the Agg canvas and leaves pyplot's backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    similarity = np.asarray(similarity, np.float64)
    size = len(layers)
    figure = Figure(figsize=(1.2 + 0.45 * size + 1.5, 1.2 + 0.45 * size), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(similarity, vmin=0.0, vmax=1.0, cmap="viridis")
    axes.set_xticks(range(size), [str(layer) for layer in layers])
    axes.set_yticks(range(size), [str(layer) for layer in layers])
    axes.set_xlabel("layer")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=9)
    if size <= 16:
        for row in range(size):
            for column in range(size):
                value = similarity[row, column]
                axes.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if value > 0.6 else "white",
                )
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def student_params(teacher_params: Any, student_config: ModelConfig) -> Any:
    """The parameters of ``student_config`` (a sharing model) taken from an unshared teacher's
    (unrolled or stacked, float32): every parameter is copied, except that a sharing layer's
    ``v_proj`` is the V slice ``qkv_proj[:, 2]`` of the teacher's layer and its ``W_Q`` and
    ``W_K`` are dropped. The result is in the student's (unrolled) layout."""
    if student_config.scan_layers:
        raise ValueError("a sharing student is unrolled; scan_layers must be False")
    teacher_config = student_config.replace(attention_sharing=())
    params = convert_layout(nn.meta.unbox(teacher_params), teacher_config)
    params = jax.tree.map(lambda leaf: leaf, dict(params))  # a copy of the containers
    for sharer in student_config.attention_anchors:
        layer = dict(params[f"layers_{sharer}"])
        mixer = dict(layer["mixer"])
        qkv = mixer.pop("qkv_proj")["kernel"]  # [d, 3, H, D], rows [Q | K | V]
        mixer["v_proj"] = {"kernel": qkv[:, 2]}
        layer["mixer"] = mixer
        params[f"layers_{sharer}"] = layer
    return params
