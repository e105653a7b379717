"""Print a sample from a trained workdir (used by ``train.py`` after training)."""

from __future__ import annotations

import pathlib

import ml_collections
from absl import logging

from jaxbased.generation import generate
from jaxbased.model import LanguageModel
from jaxbased.training.checkpointing import load_for_inference


def print_sample(workdir: pathlib.Path, sample: ml_collections.ConfigDict) -> str:
    """Generate ``sample.max_new_tokens`` tokens after ``sample.prompt`` and print the text."""
    config, params, tokenizer = load_for_inference(workdir)
    prompt = tokenizer.encode(sample.prompt)
    result = generate(
        LanguageModel(config),
        params,
        [prompt],
        max_new_tokens=sample.max_new_tokens,
        temperature=sample.temperature,
        top_k=sample.top_k,
        seed=sample.seed,
        stop_tokens=(tokenizer.eos_id,),
    )
    text = sample.prompt + tokenizer.decode(result.tokens[0])
    logging.info("sample from the trained model:")
    print("-" * 72 + "\n" + text + "\n" + "-" * 72, flush=True)
    return text
