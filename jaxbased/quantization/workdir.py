"""Quantized workdirs: what ``jaxbased-quantize`` writes and ``jaxbased-generate`` reads
(docs/quantization.md#quantized-workdirs).

    OUTPUT/
      quantized/quantization.json   model config, settings, calibration scales, source
      quantized/parameters.npz      every parameter, by its path ("layers_0/mixer/in_proj_kernel")
      tokenizer/                    the source workdir's tokenizer files

The folder is written beside its destination under a temporary name and renamed into place
when complete, so a crash never leaves a half-written quantized workdir.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from jaxbased.config import ModelConfig
from jaxbased.data.tokenizers import Tokenizer, load_tokenizer
from jaxbased.quantization.calibration import CalibrationResult, QuantizationSettings
from jaxbased.quantization.mamba import QuantizedLanguageModel

QUANTIZED_SUBDIR = "quantized"
TOKENIZER_SUBDIR = "tokenizer"
METADATA_FILE = "quantization.json"
PARAMETERS_FILE = "parameters.npz"
FORMAT_VERSION = 1
_SEPARATOR = "/"


def is_quantized_workdir(path: str | pathlib.Path) -> bool:
    """Whether ``path`` holds a quantized model (its ``quantized/quantization.json``)."""
    return (pathlib.Path(path) / QUANTIZED_SUBDIR / METADATA_FILE).is_file()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if _SEPARATOR in key:
            raise ValueError(f"parameter name {key!r} contains {_SEPARATOR!r}")
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + _SEPARATOR))
        else:
            flat[path] = np.asarray(value)
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(_SEPARATOR)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save_quantized_workdir(
    output: str | pathlib.Path,
    config: ModelConfig,
    params: dict[str, Any],
    settings: QuantizationSettings,
    tokenizer: Tokenizer,
    calibration: CalibrationResult | None = None,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a quantized workdir at ``output`` atomically (see the module doc).

    ``config`` is the float model's (stored unrolled); ``params`` those of
    ``settings.model(config)``. An existing ``output`` is a ``FileExistsError`` unless
    ``overwrite``, which replaces it only once the new one is complete.
    """
    output = pathlib.Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists (overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.writing-", dir=output.parent))
    try:
        model_config = settings.model(config).config
        (staging / QUANTIZED_SUBDIR).mkdir()
        (staging / TOKENIZER_SUBDIR).mkdir()
        tokenizer.save(staging / TOKENIZER_SUBDIR)
        np.savez(staging / QUANTIZED_SUBDIR / PARAMETERS_FILE, **_flatten(params))
        metadata = {
            "format_version": FORMAT_VERSION,
            "model": model_config.to_dict(),
            "settings": settings.to_dict(),
            "tokenizer": tokenizer.spec(),
            "calibration": None if calibration is None else calibration.to_dict(),
            "source": source or {},
        }
        (staging / QUANTIZED_SUBDIR / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        if output.exists():
            retired = output.parent / f".{output.name}.replaced"
            if retired.exists():
                shutil.rmtree(retired)
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def load_quantized_workdir(
    path: str | pathlib.Path, arithmetic: str | None = None
) -> tuple[QuantizedLanguageModel, dict[str, Any], Tokenizer, dict[str, Any]]:
    """The model, parameters, tokenizer and metadata of a quantized workdir.

    ``arithmetic`` overrides the stored one with ``int8`` or ``fake`` (both read the same int8
    parameters). Raises ``ValueError`` for a folder that is not a quantized workdir.
    """
    path = pathlib.Path(path)
    if not is_quantized_workdir(path):
        raise ValueError(
            f"{str(path)!r} is not a quantized workdir (no {QUANTIZED_SUBDIR}/{METADATA_FILE})"
        )
    metadata = json.loads((path / QUANTIZED_SUBDIR / METADATA_FILE).read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"quantized workdir {str(path)!r} has format_version "
            f"{metadata.get('format_version')}; this jaxbased reads {FORMAT_VERSION}"
        )
    settings = QuantizationSettings.from_dict(metadata["settings"])
    if arithmetic is not None:
        if (arithmetic == "float") != (settings.arithmetic == "float"):
            raise ValueError(
                f"arithmetic={arithmetic!r} cannot read parameters stored for "
                f"{settings.arithmetic!r} (int8 and fake read the same ones)"
            )
        settings = QuantizationSettings.from_dict({**settings.to_dict(), "arithmetic": arithmetic})
    config = ModelConfig.from_dict(metadata["model"])
    with np.load(path / QUANTIZED_SUBDIR / PARAMETERS_FILE) as stored:
        params = _unflatten({name: stored[name] for name in stored.files})
    tokenizer = load_tokenizer(metadata["tokenizer"], path / TOKENIZER_SUBDIR)
    return settings.model(config), params, tokenizer, metadata
