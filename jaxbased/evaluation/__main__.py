"""``python -m jaxbased.evaluation ...``: lm-evaluation-harness's command line with the
``jaxbased`` model registered (lm-eval finds models only among the modules imported)::

    python -m jaxbased.evaluation --model jaxbased --model_args workdir=W --tasks swde
"""

from __future__ import annotations


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise SystemExit(
            "lm-evaluation-harness is not installed: pip install 'jaxbased[eval]'"
        ) from error

    import jaxbased.evaluation.lm_eval_model  # noqa: F401  (registers --model jaxbased)

    cli_evaluate()


if __name__ == "__main__":
    main()
