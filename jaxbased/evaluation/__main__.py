"""``python -m jaxbased.evaluation ...``: lm-evaluation-harness's command line with the
``jaxbased`` model registered (lm-eval finds models only among the modules imported)::

    python -m jaxbased.evaluation --model jaxbased --model_args workdir=W --tasks swde

``--help`` describes the command and the model's arguments; ``--helpfull`` is lm-eval's own
help. A bad flag or model argument is one error line (exit status 2), as in every jaxbased
command (:mod:`jaxbased.cli.errors`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from jaxbased.cli import errors
from jaxbased.host_memory import apply_host_malloc_policy

MODEL_ARGS = {
    "workdir": "a train.py or jaxbased-convert workdir (or checkpoint=, not both)",
    "checkpoint": "a released checkpoint folder, imported on the fly",
    "step": "the workdir's checkpoint step (default: the newest intact one)",
    "tokenizer_file": "a GPT-2 gpt2.tiktoken or tokenizer.json (default: the model's)",
    "batch_size": "sequences per forward pass (default: lm-eval's --batch_size, else 8)",
    "max_length": "tokens of context; longer contexts keep their last tokens (default: 2048)",
    "max_gen_toks": "tokens generated when a task gives no limit (default: 256)",
    "dtype": "float32 or bfloat16 activations (default: the model's)",
    "implementation": "auto, xla or pallas kernels (default: the model's)",
}
HELP = (
    """python -m jaxbased.evaluation: lm-evaluation-harness tasks on a jaxbased model

usage: python -m jaxbased.evaluation --model jaxbased --model_args workdir=DIR[,NAME=VALUE...]
           --tasks TASK[,TASK...] [lm-eval flags]

examples:
  .venv/bin/python -m jaxbased.evaluation --model jaxbased \\
      --model_args workdir=workdirs/based-360m,batch_size=8,max_length=2048 \\
      --tasks swde,fda,squad_completion --output_path results/based-360m
  .venv/bin/python -m jaxbased.evaluation --model jaxbased --model_args workdir=workdirs/demo \\
      --tasks lambada_openai --limit 20

Needs the eval extra (pip install -e '.[eval]'); tasks are downloaded by lm-eval when online.

model arguments (--model_args NAME=VALUE,...):
"""
    + "".join(f"  {name:<15} {text}\n" for name, text in MODEL_ARGS.items())
    + """
lm-eval flags used most: --tasks, --output_path, --limit N (examples per task), --num_fewshot N,
--batch_size N, --log_samples. Every lm-eval flag: --helpfull.

common:
  --verbose       show the traceback of any error (also JAXBASED_DEBUG=1)
"""
)


def _value(argv: list[str], name: str) -> str | None:
    for index, argument in enumerate(argv):
        if argument.startswith(f"{name}="):
            return argument.split("=", 1)[1]
        if argument == name and index + 1 < len(argv):
            return argv[index + 1]
    return None


def check_model_args(argv: list[str]) -> None:
    """Usage errors for ``--model jaxbased``'s arguments, before lm-eval loads anything."""
    if _value(argv, "--model") != "jaxbased":
        return
    text = _value(argv, "--model_args")
    if text is None:
        raise errors.UsageError("--model jaxbased needs --model_args workdir=DIR (or checkpoint=)")
    values = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in MODEL_ARGS:
            raise errors.unknown_name("model argument", name, list(MODEL_ARGS))
        values[name] = value
    if ("workdir" in values) == ("checkpoint" in values):
        raise errors.UsageError("give exactly one of workdir= or checkpoint= in --model_args")
    if "workdir" in values and not (pathlib.Path(values["workdir"]) / "checkpoints").is_dir():
        raise errors.UsageError(
            f"--model_args workdir={values['workdir']} holds no checkpoints/ folder (not a "
            "train.py or jaxbased-convert workdir)"
        )
    if "checkpoint" in values and not pathlib.Path(values["checkpoint"]).is_dir():
        raise errors.UsageError(f"--model_args checkpoint={values['checkpoint']} is not a folder")
    for name in ("batch_size", "max_length", "max_gen_toks", "step"):
        value, minimum = values.get(name, "1"), 0 if name == "step" else 1
        automatic = name == "batch_size" and value.startswith("auto")
        if not automatic and not (value.isdigit() and int(value) >= minimum):
            raise errors.UsageError(
                f"--model_args {name}={values[name]} must be an integer >= {minimum}"
            )


def _raise_usage_error(parser: argparse.ArgumentParser, message: str) -> None:
    raise errors.UsageError(message)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    arguments = argv[1:]
    if not arguments or any(a in ("--help", "-h") for a in arguments):
        sys.stdout.write(HELP)
        sys.exit(0)
    verbose = errors.debug_requested(argv)
    argv = [a for a in argv if a not in ("--verbose", "--verbose=true", "--verbose=1")]
    if "--helpfull" in arguments:
        argv = [argv[0], "run", "--help"]
    modules = (errors.PACKAGE_DIRECTORY,)
    try:
        check_model_args(argv)
        apply_host_malloc_policy()  # before JAX starts its backend and threads
        try:
            from lm_eval.__main__ import cli_evaluate
        except ImportError as error:
            raise errors.UsageError(
                "lm-evaluation-harness is not installed: .venv/bin/pip install -e '.[eval]'"
            ) from error
        import lm_eval

        import jaxbased.evaluation.lm_eval_model  # noqa: F401  (registers --model jaxbased)

        modules = (errors.PACKAGE_DIRECTORY, pathlib.Path(lm_eval.__file__).parent)
        # argparse's own errors (usage text, then the message): one line here
        argparse.ArgumentParser.error = _raise_usage_error
        sys.argv = argv
        cli_evaluate()
    except SystemExit:
        raise
    except BaseException as error:  # reported, then the process exits
        sys.exit(errors.report(error, verbose=verbose, user_error_modules=modules))


if __name__ == "__main__":
    main()
