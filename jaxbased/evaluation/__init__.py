"""Evaluation: perplexity over prepared datasets and an lm-evaluation-harness model.

- :func:`evaluate_perplexity` / :func:`perplexity_of_tokens`: loss, perplexity and bits per
  token over a ``jaxbased-prepare-data`` dataset (``jaxbased-perplexity`` on the command line).
- :class:`LanguageModelScorer`: batched log-likelihoods, rolling log-likelihoods and
  generation with stop strings on token ids (what lm-eval asks of a model).
- :mod:`jaxbased.evaluation.lm_eval_model`: the ``--model jaxbased`` of lm-evaluation-harness
  (imports ``lm_eval``); ``python -m jaxbased.evaluation`` runs lm-eval's command line with it.
- :func:`load_model`: a workdir or a released checkpoint folder, with its tokenizer;
  :func:`load_inference_model`: the same, or a quantized workdir, as a model to run.
"""

from jaxbased.evaluation.loading import load_inference_model, load_model
from jaxbased.evaluation.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    perplexity_of_tokens,
)
from jaxbased.evaluation.scoring import LanguageModelScorer, rolling_windows

__all__ = [
    "LanguageModelScorer",
    "PerplexityResult",
    "evaluate_perplexity",
    "load_inference_model",
    "load_model",
    "perplexity_of_tokens",
    "rolling_windows",
]
