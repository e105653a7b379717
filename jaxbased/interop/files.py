"""Checkpoint folders of the released models: ``config.json`` plus ``pytorch_model.bin`` or
``model.safetensors``.

Three families share this folder layout, told apart by ``config.json``
(:func:`checkpoint_family`):

- ``"based"``: HazyResearch/based's ``GPTLMHeadModel`` (a ``GPT2Config`` with mixer dicts:
  based-*, attn-*), mapped by :mod:`jaxbased.interop.reference_config` and
  :mod:`jaxbased.interop.state_dict`;
- ``"mamba"``: mamba_ssm's ``MambaLMHeadModel`` (a ``MambaConfig``: the reference's mamba-*,
  state-spaces' mamba-* and mamba2-*), mapped by :mod:`jaxbased.interop.mamba_checkpoint`;
- ``"transnormer"``: OpenNLPLab's ``TransnormerForCausalLM`` (a ``TransnormerConfig``,
  ``model_type`` ``transnormer``: TransNormerLLM-385M, -1B), mapped by
  :mod:`jaxbased.interop.transnormer_checkpoint` (import only).

:func:`save_checkpoint` writes a model in the layout it can have (:func:`export_family`).

Reading a ``.bin`` (a pickled PyTorch state dict) needs ``torch`` (the ``torch`` extra), imported
only then; ``.safetensors`` files are read with the ``safetensors`` package's NumPy API and need
no torch (bfloat16 tensors, which NumPy cannot name, are decoded from the raw bytes with
``ml_dtypes``). Every tensor comes back as a float32 NumPy array (integer buffers keep their
dtype).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxbased.config import ModelConfig
from jaxbased.interop.mamba_checkpoint import (
    MAMBA_LAYERS,
    export_mamba_state_dict,
    import_mamba_state_dict,
    mamba_config_from_reference,
    mamba_config_to_reference,
    mamba_layout_problems,
)
from jaxbased.interop.reference_config import (
    UnsupportedCheckpointError,
    config_from_reference,
    config_to_reference,
)
from jaxbased.interop.state_dict import (
    Params,
    clean_state_dict,
    export_state_dict,
    import_state_dict,
)
from jaxbased.interop.tokenizer import find_tokenizer_file
from jaxbased.interop.transnormer_checkpoint import (
    TRANSNORMER_MODEL_TYPE,
    import_transnormer_state_dict,
    transnormer_config_from_reference,
)

CONFIG_FILE = "config.json"
BIN_FILE = "pytorch_model.bin"
SAFETENSORS_FILE = "model.safetensors"
#: HazyResearch/based's ``GPTLMHeadModel`` layout (``GPT2Config``, ``transformer.*`` keys).
BASED_FAMILY = "based"
#: mamba_ssm's ``MambaLMHeadModel`` layout (``MambaConfig``, ``backbone.*`` keys).
MAMBA_FAMILY = "mamba"
#: OpenNLPLab's ``TransnormerForCausalLM`` layout (``TransnormerConfig``, ``model.*`` keys).
TRANSNORMER_FAMILY = "transnormer"
#: Mixers the BASED layout (``GPTLMHeadModel``) can hold.
BASED_LAYOUT_MIXERS = frozenset({"base_conv", "based", "sliding_window", "attention"})


@dataclasses.dataclass(frozen=True)
class ImportedCheckpoint:
    """A released checkpoint in jaxbased form.

    Attributes:
      config: the model config (from ``config.json`` and the overrides).
      params: float32 NumPy parameter tree for :class:`~jaxbased.LanguageModel`.
      reference_config: the parsed ``config.json``.
      weights_file: the file the weights came from.
      dropped_keys: keys removed before matching (``metrics`` counters).
      ignored_keys: accepted keys that carry no parameter (tied ``lm_head.weight``, unused
        buffers).
      tokenizer_file: a tokenizer file found in the folder, if any.
      family: the layout it came in, ``"based"``, ``"mamba"`` or ``"transnormer"`` (see
        :func:`checkpoint_family`).
    """

    config: ModelConfig
    params: Params
    reference_config: dict[str, Any]
    weights_file: pathlib.Path
    dropped_keys: tuple[str, ...]
    ignored_keys: tuple[str, ...]
    tokenizer_file: pathlib.Path | None
    family: str = BASED_FAMILY


def _to_numpy_torch(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        return tensor.to(torch.float32).numpy()
    return tensor.numpy()


def read_bin(path: str | pathlib.Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """A ``pytorch_model.bin`` state dict as NumPy arrays (needs ``torch``).

    Loads with ``weights_only=True`` (tensors and plain containers only); ``allow_pickle=True``
    unpickles arbitrary objects, which runs code from the file: only for files you trust. A
    Lightning checkpoint (a dict with a ``state_dict`` entry) is unwrapped.
    """
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs PyTorch: pip install 'jaxbased[torch]' (or convert the "
            "weights to model.safetensors, which needs no torch)"
        ) from error

    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=mmap)

    try:
        try:
            loaded = load(mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            loaded = load(mmap=False)
    except pickle.UnpicklingError as error:
        if allow_pickle:
            raise
        raise ValueError(
            f"{path} holds objects other than tensors ({error}); if you trust the file, load it "
            "with allow_pickle=True (jaxbased-convert --allow_pickle)"
        ) from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(loaded).__name__})")
    return {
        key: _to_numpy_torch(value) if isinstance(value, torch.Tensor) else np.asarray(value)
        for key, value in loaded.items()
    }


def _safetensors_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    return header, 8 + length


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as NumPy arrays (floats as float32), without torch."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    header, data_start = _safetensors_header(path)
    tensors: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="numpy") as file:
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] == "BF16":  # NumPy has no bfloat16: decode the raw bytes
                import ml_dtypes

                begin, end = info["data_offsets"]
                with open(path, "rb") as raw:
                    raw.seek(data_start + begin)
                    buffer = raw.read(end - begin)
                value = np.frombuffer(buffer, ml_dtypes.bfloat16).reshape(info["shape"])
            else:
                value = file.get_tensor(key)
            if np.issubdtype(value.dtype, np.floating) or value.dtype.kind == "V":
                value = value.astype(np.float32)
            tensors[key] = value
    return tensors


def read_state_dict(
    path: str | pathlib.Path, *, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
    """A ``.bin`` / ``.pt`` / ``.pth`` (torch) or ``.safetensors`` state dict, by suffix."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return read_bin(path, allow_pickle=allow_pickle)
    raise ValueError(f"{str(path)!r}: unknown weights format (expected .bin or .safetensors)")


def find_weights(folder: pathlib.Path) -> pathlib.Path:
    """``model.safetensors`` if present (no torch needed), else ``pytorch_model.bin``."""
    for name in (SAFETENSORS_FILE, BIN_FILE):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(
        f"checkpoint folder {str(folder)!r} has neither {SAFETENSORS_FILE} nor {BIN_FILE}"
    )


def checkpoint_family(values: Any, *, source: str = CONFIG_FILE) -> str:
    """The family of a parsed ``config.json``: ``"transnormer"`` for ``model_type``
    ``transnormer`` (OpenNLPLab's ``TransnormerConfig``), ``"mamba"`` for mamba_ssm's
    ``MambaConfig``
    (``d_model`` or ``ssm_cfg``, with ``d_model`` and ``n_layer`` required; the reference's
    ``MambaConfig`` also carries GPT-2 fields such as ``n_embd``, which do not count),
    ``"based"`` for a ``GPT2Config`` (``n_embd`` or ``hidden_size``, ``n_layer`` or
    ``num_hidden_layers``, ``vocab_size``, ``model_type`` absent or ``gpt2``).

    Raises ``ValueError`` naming ``source``, its ``model_type`` and keys when it is neither
    (for instance transformers' ``MambaConfig`` of the ``*-hf`` repositories), or the fields a
    ``MambaConfig`` lacks.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{source} holds a JSON {type(values).__name__}, not an object")
    model_type = values.get("model_type")
    if model_type == TRANSNORMER_MODEL_TYPE:
        return TRANSNORMER_FAMILY
    if ("d_model" in values or "ssm_cfg" in values) and model_type in (None, "mamba"):
        absent = [name for name in ("d_model", "n_layer") if name not in values]
        if absent:
            raise ValueError(
                f"{source} looks like mamba_ssm's MambaConfig but lacks {absent} (the model's "
                "width and depth are not guessed from MambaConfig's defaults)"
            )
        return MAMBA_FAMILY
    has_width = any(name in values for name in ("n_embd", "hidden_size"))
    has_depth = any(name in values for name in ("n_layer", "num_hidden_layers"))
    if has_width and has_depth and "vocab_size" in values and model_type in (None, "gpt2"):
        return BASED_FAMILY
    keys = sorted(str(key) for key in values)
    shown = ", ".join(keys[:24]) + (f", ... ({len(keys)} keys)" if len(keys) > 24 else "")
    raise ValueError(
        f"{source} is neither a GPT2Config of HazyResearch/based (n_embd, n_layer, vocab_size; "
        "model_type absent or 'gpt2') nor a MambaConfig of mamba_ssm (d_model, n_layer, "
        f"ssm_cfg); found model_type={model_type!r} and keys [{shown}]"
        + (
            " (transformers' Mamba configs of the '-hf' repositories are not read: use the "
            "mamba_ssm checkpoint, e.g. state-spaces/mamba-130m rather than mamba-130m-hf)"
            if str(model_type).startswith("mamba")
            else ""
        )
    )


def export_family(config: ModelConfig) -> str:
    """The layout :func:`save_checkpoint` writes ``config`` in: ``"mamba"`` (mamba_ssm) when
    every layer is ``mamba`` or every layer ``mamba2`` and the blocks have no MLP, ``"based"``
    (``GPTLMHeadModel``) when every layer is ``base_conv``, ``based``, ``sliding_window`` or
    ``attention``.

    Raises :class:`UnsupportedCheckpointError` naming the layer kinds (and what stops the
    mamba_ssm layout) when neither layout holds the model.
    """
    kinds = set(config.layer_pattern)
    if kinds <= set(MAMBA_LAYERS):
        problems = mamba_layout_problems(config)
        if problems:
            raise UnsupportedCheckpointError(
                "cannot export to mamba_ssm's layout: " + "; ".join(problems)
            )
        return MAMBA_FAMILY
    if kinds <= BASED_LAYOUT_MIXERS:
        return BASED_FAMILY
    raise UnsupportedCheckpointError(
        f"layer_pattern uses {sorted(kinds)}: no released layout holds it (HazyResearch/based's "
        f"GPTLMHeadModel takes {sorted(BASED_LAYOUT_MIXERS)}; mamba_ssm's MambaLMHeadModel "
        "takes all 'mamba' or all 'mamba2' layers with use_mlp=False)"
    )


def load_checkpoint(
    folder: str | pathlib.Path,
    *,
    weights_file: str | pathlib.Path | None = None,
    allow_pickle: bool = False,
    **config_overrides: Any,
) -> ImportedCheckpoint:
    """Import a released checkpoint folder (``config.json`` + weights) into jaxbased, in the
    family its ``config.json`` names (:func:`checkpoint_family`): a BASED/attention
    ``GPT2Config``, a Mamba / Mamba-2 ``MambaConfig`` or a ``TransnormerConfig``.

    Args:
      folder: holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``.
      weights_file: a weights file to use instead of the folder's.
      allow_pickle: let ``torch.load`` unpickle non-tensor objects (trusted files only).
      config_overrides: :class:`ModelConfig` fields that ``config.json`` does not decide
        (``dtype``, ``implementation``, ``chunk_size``, ...).

    Raises ``ValueError`` (:class:`~jaxbased.interop.UnsupportedCheckpointError`,
    :class:`~jaxbased.interop.CheckpointMismatchError`) naming what does not fit, or when
    ``config.json`` is of neither family.
    """
    folder = pathlib.Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"checkpoint folder {str(folder)!r} has no {CONFIG_FILE}")
    try:
        reference_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    family = checkpoint_family(reference_config, source=str(config_path))
    if family == MAMBA_FAMILY:
        config = mamba_config_from_reference(reference_config, **config_overrides)
    elif family == TRANSNORMER_FAMILY:
        config = transnormer_config_from_reference(reference_config, **config_overrides)
    else:
        config = config_from_reference(reference_config, **config_overrides)
    weights = pathlib.Path(weights_file) if weights_file is not None else find_weights(folder)
    raw = read_state_dict(weights, allow_pickle=allow_pickle)
    if family == TRANSNORMER_FAMILY:  # its "model." prefix is part of the released layout
        state, dropped = dict(raw), []
    else:
        state, dropped = clean_state_dict(raw)  # a Lightning "model." prefix, metric counters
    if family == MAMBA_FAMILY:
        params, ignored = import_mamba_state_dict(state, config)
    elif family == TRANSNORMER_FAMILY:
        params, ignored = import_transnormer_state_dict(state, config)
    else:
        params, ignored = import_state_dict(state, config)
    tokenizer_file = find_tokenizer_file(folder)
    return ImportedCheckpoint(
        config=config,
        params=params,
        reference_config=reference_config,
        weights_file=weights,
        dropped_keys=tuple(dropped),
        ignored_keys=tuple(ignored),
        tokenizer_file=tokenizer_file,
        family=family,
    )


def save_checkpoint(
    folder: str | pathlib.Path,
    config: ModelConfig,
    params: Params,
    *,
    format: str = "safetensors",
    include_lm_head: bool = True,
) -> pathlib.Path:
    """Write ``config.json`` and the weights in the released layout; returns the weights file.

    The layout is the one the model can have (:func:`export_family`): mamba_ssm's
    (``MambaConfig``, ``backbone.*``) for all-``mamba`` or all-``mamba2`` models without MLPs,
    HazyResearch/based's ``GPTLMHeadModel`` (``GPT2Config``, ``transformer.*``) for BASED and
    attention models; anything else raises :class:`UnsupportedCheckpointError`.
    ``format``: ``"safetensors"`` (``model.safetensors``, no torch needed) or ``"bin"``
    (``pytorch_model.bin`` via ``torch.save``). The file holds float32 tensors under the
    released names (no ``model.`` prefix), which :func:`load_checkpoint` and the reference's
    ``load_state_dict`` read back.
    """
    if format not in ("safetensors", "bin"):
        raise ValueError(f"format={format!r} is not known; allowed: 'safetensors', 'bin'")
    folder = pathlib.Path(folder)
    if export_family(config) == MAMBA_FAMILY:
        reference_config = mamba_config_to_reference(config)
        state = export_mamba_state_dict(params, config, include_lm_head=include_lm_head)
    else:
        reference_config = config_to_reference(config)
        state = export_state_dict(params, config, include_lm_head=include_lm_head)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(reference_config, indent=2) + "\n")
    if format == "safetensors":
        from safetensors.numpy import save_file

        target = folder / SAFETENSORS_FILE
        save_file(state, str(target), metadata={"format": "pt"})
    else:
        import torch

        target = folder / BIN_FILE
        torch.save({key: torch.tensor(value) for key, value in state.items()}, target)
    return target
