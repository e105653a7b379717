"""Released PyTorch state dicts <-> jaxbased parameter trees (docs/checkpoints.md).

A PyTorch ``Linear`` weight ``W [out, in]`` computes ``y = x Wᵀ``; our :class:`Projection`
kernel ``K`` has shape ``in_shape + out_shape`` and computes ``y = x · K``, so

    K = Wᵀ.reshape(in_shape + out_shape),      W = K.reshape(prod(in_shape), prod(out_shape))ᵀ

with the reference's flattening order (head-major, e.g. ``Wqkv`` rows ``(three, head, dim)``,
``fc1`` rows ``(value | gate, hidden)``, BaseConv ``in_proj`` rows ``(u1 | u2, channel)``). The
depthwise conv weight ``[C, 1, K]`` is our ``conv_weight [K, C]``; norms and the embedding are
copied. Every mapping is a transpose and a reshape, so import and export are exact inverses.

Keys of a released state dict (after :func:`clean_state_dict`)::

    transformer.embeddings.word_embeddings.weight            [V_padded, d]
    transformer.layers.{i}.norm1.weight / .norm2.weight      [d]
    transformer.layers.{i}.mlp.fc1.weight [2 n, d]  .mlp.fc2.weight [d, n]
    transformer.layers.{i}.mixer....                          per mixer, see _layer_rules
    transformer.ln_f.weight                                   [d]
    lm_head.weight                                            tied: must equal the embedding

Also accepted and not imported: ``transformer.decay.decay`` (a buffer of based-1b, unused by
the forward pass) and ``*.rotary_emb.inv_freq`` (checked against our frequencies).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxbased.config import ModelConfig
from jaxbased.layer_layout import convert_layout, to_unrolled
from jaxbased.ops.rotary import rotary_frequencies

EMBEDDING_KEY = "transformer.embeddings.word_embeddings.weight"
LM_HEAD_KEY = "lm_head.weight"
FINAL_NORM_KEY = "transformer.ln_f.weight"
#: Buffers of the reference that the forward pass does not use.
IGNORED_KEY_PATTERNS = (re.compile(r"^transformer\.decay\.decay$"),)
INV_FREQ_PATTERN = re.compile(r"^transformer\.layers\.(\d+)\.mixer\.rotary_emb\.inv_freq$")

Params = dict[str, Any]


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: every missing, unexpected or mis-shaped key is named.

    Attributes:
      missing: keys the model needs that the state dict lacks.
      unexpected: keys the state dict has that the model does not use.
      mismatched: ``(key, checkpoint shape, expected shape)`` triples.
      other: further problems (an untied head, a wrong rotary buffer).
    """

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        other: list[str],
        expected_shapes: Mapping[str, tuple[int, ...]],
        found_shapes: Mapping[str, tuple[int, ...]],
    ) -> None:
        self.missing, self.unexpected = missing, unexpected
        self.mismatched, self.other = mismatched, other
        lines = [
            f"  missing: {key} (expected shape {list(expected_shapes[key])})" for key in missing
        ]
        lines += [f"  unexpected: {key} (shape {list(found_shapes[key])})" for key in unexpected]
        lines += [
            f"  shape mismatch: {key}: checkpoint {list(found)}, expected {list(expected)}"
            for key, found, expected in mismatched
        ]
        lines += [f"  {problem}" for problem in other]
        super().__init__(
            f"the checkpoint does not match the model ({len(lines)} problems):\n" + "\n".join(lines)
        )


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one reference tensor maps onto one of our parameters."""

    key: str
    path: tuple[str, ...]
    reference_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_reference: Callable[[np.ndarray], np.ndarray]


def _linear(key: str, path: tuple[str, ...], in_shape: tuple, out_shape: tuple) -> _Rule:
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return _Rule(
        key,
        path,
        (n_out, n_in),
        lambda weight: weight.T.reshape(in_shape + out_shape),
        lambda kernel: kernel.reshape(n_in, n_out).T,
    )


def _bias(key: str, path: tuple[str, ...], out_shape: tuple) -> _Rule:
    size = math.prod(out_shape)
    return _Rule(
        key, path, (size,), lambda b: b.reshape(out_shape), lambda bias: bias.reshape(size)
    )


def _copy(key: str, path: tuple[str, ...], shape: tuple) -> _Rule:
    return _Rule(key, path, shape, lambda x: x, lambda x: x)


def _conv(key: str, path: tuple[str, ...], kernel_size: int, channels: int) -> _Rule:
    # torch depthwise Conv1d weight [C, 1, K]  <->  our conv_weight [K, C].
    return _Rule(
        key,
        path,
        (channels, 1, kernel_size),
        lambda weight: weight[:, 0, :].T,
        lambda kernel: kernel.T[:, None, :],
    )


def _layer_rules(config: ModelConfig, index: int, mixer: str) -> list[_Rule]:
    d = config.d_model
    prefix, ours = f"transformer.layers.{index}", f"layers_{index}"
    rules = [
        _copy(f"{prefix}.norm1.weight", (ours, "norm1", "weight"), (d,)),
        _copy(f"{prefix}.norm2.weight", (ours, "norm2", "weight"), (d,)),
        _linear(
            f"{prefix}.mlp.fc1.weight",
            (ours, "mlp", "fc1", "kernel"),
            (d,),
            (2, config.mlp_hidden_dim),
        ),
        _linear(
            f"{prefix}.mlp.fc2.weight",
            (ours, "mlp", "fc2", "kernel"),
            (config.mlp_hidden_dim,),
            (d,),
        ),
    ]
    m, mine = f"{prefix}.mixer", (ours, "mixer")
    if mixer == "base_conv":
        channels = config.base_conv.channels(d)
        rules += [
            _linear(f"{m}.in_proj.weight", (*mine, "in_proj", "kernel"), (d,), (2, channels)),
            _bias(f"{m}.in_proj.bias", (*mine, "in_proj", "bias"), (2, channels)),
            _conv(
                f"{m}.conv.conv.weight",
                (*mine, "conv_weight"),
                config.base_conv.kernel_size,
                channels,
            ),
            _linear(f"{m}.out_proj.weight", (*mine, "out_proj", "kernel"), (channels,), (d,)),
            _bias(f"{m}.out_proj.bias", (*mine, "out_proj", "bias"), (d,)),
        ]
    elif mixer == "based":
        heads, features = config.based.heads, config.based.feature_dim
        value_dim = config.based.value_dim(d)
        rules += [
            _linear(f"{m}.proj_q.weight", (*mine, "proj_q", "kernel"), (d,), (heads, features)),
            _linear(f"{m}.proj_k.weight", (*mine, "proj_k", "kernel"), (d,), (heads, features)),
            _linear(f"{m}.proj_v.weight", (*mine, "proj_v", "kernel"), (d,), (heads, value_dim)),
            _linear(
                f"{m}.out_proj.weight", (*mine, "out_proj", "kernel"), (heads, value_dim), (d,)
            ),
        ]
    elif mixer in ("sliding_window", "attention"):
        section = getattr(config, mixer)
        heads, head_dim = section.heads, section.head_dim(d)
        rules += [
            _linear(f"{m}.Wqkv.weight", (*mine, "qkv_proj", "kernel"), (d,), (3, heads, head_dim)),
            _linear(f"{m}.out_proj.weight", (*mine, "out_proj", "kernel"), (heads, head_dim), (d,)),
        ]
    else:
        raise ValueError(f"mixer {mixer!r} of layer {index} has no reference layout")
    return rules


def parameter_rules(config: ModelConfig) -> list[_Rule]:
    """One rule per tensor of the reference layout, in the reference's state-dict order."""
    rules = [
        _copy(EMBEDDING_KEY, ("embedding",), (config.padded_vocab_size, config.d_model)),
    ]
    for index, mixer in enumerate(config.layer_pattern):
        rules += _layer_rules(config, index, mixer)
    rules.append(_copy(FINAL_NORM_KEY, ("final_norm", "weight"), (config.d_model,)))
    return rules


def reference_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{reference key: shape}`` of the tensors a state dict must hold for ``config``
    (``lm_head.weight`` excluded: it is optional and tied)."""
    return {rule.key: rule.reference_shape for rule in parameter_rules(config)}


def clean_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Strip a leading ``model.`` (Lightning) from every key and drop keys containing
    ``metrics`` (the training metrics' counters); returns the new dict and the dropped keys."""
    cleaned, dropped = {}, []
    for key, value in state_dict.items():
        if "metrics" in key:
            dropped.append(key)
            continue
        cleaned[key[len("model.") :] if key.startswith("model.") else key] = value
    return cleaned, dropped


def _set(tree: Params, path: tuple[str, ...], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(dim) for dim in np.shape(value))


def import_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig
) -> tuple[Params, list[str]]:
    """Our float32 parameter tree from a reference state dict (keys already cleaned), in the
    parameter layout of ``config`` (stacked when it scans its layers: ``jaxbased.layer_layout``).

    Returns ``(params, ignored_keys)``; ``ignored_keys`` are accepted buffers that the forward
    pass does not need. Raises :class:`CheckpointMismatchError` listing every missing,
    unexpected and mis-shaped key (and an untied ``lm_head.weight``) at once.
    """
    rules = parameter_rules(config)
    expected = {rule.key: rule.reference_shape for rule in rules}

    def extra_key(key: str, found: dict, report: _MismatchReport) -> None:
        if any(pattern.match(key) for pattern in IGNORED_KEY_PATTERNS):
            report.ignored.append(key)
        elif key == LM_HEAD_KEY:
            check_tied_head(state_dict, found, expected, report)
        elif match := INV_FREQ_PATTERN.match(key):
            index = int(match.group(1))
            if index >= config.num_layers or config.layer_pattern[index] not in (
                "sliding_window",
                "attention",
            ):
                report.unexpected.append(key)
                return
            section = getattr(config, config.layer_pattern[index])
            ours = np.asarray(
                rotary_frequencies(section.rotary_dim(config.d_model), section.rotary_base)
            )
            theirs = np.asarray(state_dict[key], np.float32)
            if theirs.shape != ours.shape:
                report.mismatched.append((key, theirs.shape, ours.shape))
            elif not np.allclose(theirs, ours, rtol=1e-5, atol=0):
                report.other.append(
                    f"{key} differs from rotary_base={section.rotary_base} frequencies"
                )
            report.ignored.append(key)
        else:
            report.unexpected.append(key)

    params, ignored = params_from_rules(state_dict, rules, extra_key)
    return convert_layout(params, config), ignored


@dataclasses.dataclass
class _MismatchReport:
    """What a state dict lacks or has in excess, collected before one error is raised."""

    missing: list[str]
    mismatched: list[tuple[str, tuple, tuple]]
    unexpected: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    other: list[str] = dataclasses.field(default_factory=list)


def check_tied_head(
    state_dict: Mapping[str, Any],
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    report: _MismatchReport,
    embedding_key: str = EMBEDDING_KEY,
) -> None:
    """Accept ``lm_head.weight`` (ignored: the head is tied) only if it equals the embedding
    (``embedding_key``)."""
    report.ignored.append(LM_HEAD_KEY)
    embedding_shape = expected[embedding_key]
    if found[LM_HEAD_KEY] != embedding_shape:
        report.mismatched.append((LM_HEAD_KEY, found[LM_HEAD_KEY], embedding_shape))
    elif found.get(embedding_key) == embedding_shape and not np.array_equal(
        np.asarray(state_dict[LM_HEAD_KEY], np.float32),
        np.asarray(state_dict[embedding_key], np.float32),
    ):
        report.other.append(
            f"untied head: {LM_HEAD_KEY} differs from {embedding_key} (jaxbased ties the head "
            "to the embedding)"
        )


def params_from_rules(
    state_dict: Mapping[str, Any],
    rules: list[_Rule],
    extra_key: Callable[[str, dict, _MismatchReport], None],
) -> tuple[Params, list[str]]:
    """Check ``state_dict`` against ``rules`` and build our float32 parameter tree.

    Keys that no rule names go to ``extra_key(key, found_shapes, report)``, which files them as
    ignored, unexpected, mismatched or other. Raises :class:`CheckpointMismatchError` listing
    every problem at once; returns ``(params, ignored_keys)``.
    """
    expected = {rule.key: rule.reference_shape for rule in rules}
    found = {key: _shape(value) for key, value in state_dict.items()}
    report = _MismatchReport(
        missing=[key for key in expected if key not in state_dict],
        mismatched=[
            (key, found[key], shape)
            for key, shape in expected.items()
            if key in state_dict and found[key] != shape
        ],
    )
    for key in state_dict:
        if key not in expected:
            extra_key(key, found, report)
    if report.missing or report.unexpected or report.mismatched or report.other:
        raise CheckpointMismatchError(
            report.missing,
            sorted(report.unexpected),
            report.mismatched,
            report.other,
            expected,
            found,
        )
    params: Params = {}
    for rule in rules:
        value = np.asarray(state_dict[rule.key], np.float32)
        _set(params, rule.path, np.ascontiguousarray(rule.to_ours(value)))
    return params, report.ignored


def export_state_dict(
    params: Mapping[str, Any], config: ModelConfig, *, include_lm_head: bool = True
) -> dict[str, np.ndarray]:
    """The reference state dict (float32 NumPy, released key names, no ``model.`` prefix) of our
    parameters; ``lm_head.weight`` (a copy of the embedding, as the tied reference model's
    ``state_dict()`` has it) unless ``include_lm_head`` is False.

    ``params`` may have either layout (unrolled or stacked, ``jaxbased.layer_layout``). Raises
    ``ValueError`` naming every parameter whose shape does not fit ``config``.
    """
    params = to_unrolled(params, config)
    return state_from_rules(params, parameter_rules(config), EMBEDDING_KEY, include_lm_head)


def state_from_rules(
    params: Mapping[str, Any],
    rules: list[_Rule],
    embedding_key: str,
    include_lm_head: bool,
) -> dict[str, np.ndarray]:
    """The reference-layout tensors of ``params`` under ``rules`` (float32 NumPy), plus
    ``lm_head.weight`` as a copy of ``embedding_key`` when ``include_lm_head``.

    Raises ``ValueError`` naming every parameter that is missing or does not fit its rule.
    """
    problems, state = [], {}
    for rule in rules:
        try:
            value = np.asarray(_get(params, rule.path), np.float32)
        except (KeyError, TypeError):
            problems.append(f"missing parameter {'/'.join(rule.path)}")
            continue
        try:
            reference = np.ascontiguousarray(rule.to_reference(value))
        except ValueError:  # a reshape of the wrong number of elements
            reference = value
        if reference.shape != rule.reference_shape:
            problems.append(
                f"{'/'.join(rule.path)} has shape {list(value.shape)}; {rule.key} needs "
                f"{list(rule.reference_shape)}"
            )
            continue
        state[rule.key] = reference
    if problems:
        raise ValueError("parameters do not fit the config: " + "; ".join(problems))
    if include_lm_head:
        state[LM_HEAD_KEY] = state[embedding_key].copy()
    return state
