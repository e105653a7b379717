"""lm-evaluation-harness model ``jaxbased`` (needs the ``lm-eval`` package: the ``eval`` extra).

Importing this module registers the model; ``python -m jaxbased.evaluation`` imports it and runs
lm-eval's command line, so that ``--model jaxbased`` works there::

    python -m jaxbased.evaluation --model jaxbased \
        --model_args workdir=workdirs/based-360m,batch_size=8 --tasks swde,fda,squad_completion

Model arguments (``--model_args k=v,...``): ``workdir`` (a ``train.py`` / ``jaxbased-convert``
workdir, or a ``jaxbased-quantize`` one) or ``checkpoint`` (a released folder, imported on the
fly); ``step``, ``tokenizer_file``, ``batch_size`` (8), ``max_length`` (2048: contexts keep
their last tokens), ``max_gen_toks`` (256, the default when a task gives none), ``dtype``,
``implementation``.

The three request kinds go to :class:`~jaxbased.evaluation.scoring.LanguageModelScorer`; text is
tokenized here with the model's tokenizer (GPT-2 for the released checkpoints). An empty
context is the end-of-text token, as lm-eval's ``TemplateLM`` does it. ``generate_until`` is
greedy unless a task asks ``do_sample`` with a temperature; other sampling arguments are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from jaxbased.evaluation.loading import load_inference_model
from jaxbased.evaluation.scoring import LanguageModelScorer

MAX_GEN_TOKS_NAMES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def _batch_size(value: Any, default: int = 8) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    return int(value)


@register_model("jaxbased")
class JaxBasedLM(TemplateLM):
    """A jaxbased model in lm-evaluation-harness (see the module docstring for the arguments)."""

    def __init__(
        self,
        workdir: str | None = None,
        checkpoint: str | None = None,
        step: int | None = None,
        tokenizer_file: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        implementation: str | None = None,
        **ignored: Any,
    ) -> None:
        super().__init__()
        del ignored  # lm-eval also passes device, max_batch_size, ...
        overrides = {
            name: value
            for name, value in (("dtype", dtype), ("implementation", implementation))
            if value is not None
        }
        model, params, tokenizer = load_inference_model(
            workdir=workdir,
            checkpoint=checkpoint,
            step=None if step is None else int(step),
            tokenizer_file=tokenizer_file,
            **overrides,
        )
        self.config, self.tokenizer = model.config, tokenizer
        self._max_gen_toks = int(max_gen_toks)
        self.scorer = LanguageModelScorer(
            model,
            params,
            tokenizer,
            batch_size=_batch_size(batch_size),
            max_length=int(max_length),
        )

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> JaxBasedLM:
        """``--model_args k=v,...`` plus what lm-eval's command line adds (``batch_size``,
        ``max_batch_size``, ``device``): a value in ``--model_args`` wins (lm-eval would pass
        ``batch_size`` twice)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> JaxBasedLM:
        """As :meth:`create_from_arg_string`, from a dict; an unknown model argument is a
        ``ValueError`` naming the closest known one."""
        import difflib

        known = [name for name in cls.__init__.__code__.co_varnames[1:] if name != "ignored"]
        known = known[: cls.__init__.__code__.co_argcount - 1]
        for name in arg_dict:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ValueError(
                    f"unknown model argument {name}{hint} (allowed: {', '.join(known)})"
                )
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **dict(arg_dict)})

    # Tokenization -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.spec())

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        del add_special_tokens, kwargs  # GPT-2 adds no special tokens
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # Requests -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = self.scorer.loglikelihood([(context, cont) for _, context, cont in requests])
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        documents = [self.tok_encode(request.args[0]) for request in requests]
        results = self.scorer.rolling_loglikelihood(documents, self.eot_token_id)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def _generation_settings(
        self, gen_kwargs: dict[str, Any]
    ) -> tuple[tuple[str, ...], int, float]:
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        max_new = next(
            (int(gen_kwargs[n]) for n in MAX_GEN_TOKS_NAMES if gen_kwargs.get(n) is not None),
            self.max_gen_toks,
        )
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", False):
            temperature = 0.0
        return tuple(until), max_new, temperature

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple[tuple[str, ...], int, float], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self._generation_settings(dict(request.args[1])), []).append(index)
        results = [""] * len(requests)
        for (until, max_new, temperature), indices in groups.items():
            contexts = [
                self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in indices
            ]
            texts = self.scorer.generate_until(
                contexts, until=until, max_new_tokens=max_new, temperature=temperature
            )
            for index, text in zip(indices, texts, strict=True):
                results[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results
