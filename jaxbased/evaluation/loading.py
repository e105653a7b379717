"""One way to get ``(config, params, tokenizer)`` for evaluation: a ``train.py`` workdir
(including one written by ``jaxbased-convert``) or a released checkpoint folder imported on the
fly (with the GPT-2 tokenizer found as :func:`jaxbased.interop.tokenizer.checkpoint_tokenizer`
finds it)."""

from __future__ import annotations

import pathlib
from typing import Any

from jaxbased.config import ModelConfig
from jaxbased.data.tokenizers import Tokenizer


def load_model(
    *,
    workdir: str | pathlib.Path | None = None,
    checkpoint: str | pathlib.Path | None = None,
    step: int | None = None,
    tokenizer_file: str | pathlib.Path | None = None,
    **config_overrides: Any,
) -> tuple[ModelConfig, Any, Tokenizer]:
    """The model config, float32 parameters and tokenizer of exactly one of ``workdir`` /
    ``checkpoint``; ``config_overrides`` (``dtype``, ``implementation``, ...) replace config
    fields that do not change the parameters."""
    if (workdir is None) == (checkpoint is None):
        raise ValueError("give exactly one of workdir (a train.py run) or checkpoint (a folder)")
    if workdir is not None:
        from jaxbased.training.checkpointing import load_for_inference

        config, params, tokenizer = load_for_inference(workdir, step)
        if tokenizer_file is not None:
            from jaxbased.data.tokenizers import gpt2_tokenizer

            tokenizer = gpt2_tokenizer(tokenizer_file)
        if config_overrides:
            config = config.replace(**config_overrides)
        return config, params, tokenizer
    from jaxbased.interop import load_checkpoint
    from jaxbased.interop.tokenizer import checkpoint_tokenizer

    imported = load_checkpoint(checkpoint, **config_overrides)
    return imported.config, imported.params, checkpoint_tokenizer(checkpoint, tokenizer_file)


def load_inference_model(
    *,
    workdir: str | pathlib.Path | None = None,
    checkpoint: str | pathlib.Path | None = None,
    step: int | None = None,
    tokenizer_file: str | pathlib.Path | None = None,
    **config_overrides: Any,
) -> tuple[Any, Any, Tokenizer]:
    """``(model, params, tokenizer)`` of what :func:`load_model` reads, or of a quantized
    workdir written by ``jaxbased-quantize`` (docs/quantization.md#quantized-workdirs): the model
    is then its ``QuantizedLanguageModel``, else ``LanguageModel(config)``. A quantized workdir
    takes no ``step`` and no config overrides (``ValueError``)."""
    from jaxbased.model import LanguageModel
    from jaxbased.quantization.workdir import is_quantized_workdir, load_quantized_workdir

    if workdir is not None and checkpoint is None and is_quantized_workdir(workdir):
        if step is not None or config_overrides:
            given = ["step"] * (step is not None) + sorted(config_overrides)
            raise ValueError(
                f"workdir {str(workdir)!r} is a quantized workdir (one model, its settings "
                f"fixed): drop {', '.join(given)}"
            )
        model, params, tokenizer, _ = load_quantized_workdir(workdir)
        if tokenizer_file is not None:
            from jaxbased.data.tokenizers import gpt2_tokenizer

            tokenizer = gpt2_tokenizer(tokenizer_file)
        return model, params, tokenizer
    config, params, tokenizer = load_model(
        workdir=workdir,
        checkpoint=checkpoint,
        step=step,
        tokenizer_file=tokenizer_file,
        **config_overrides,
    )
    return LanguageModel(config), params, tokenizer
