"""One clear line for a user's mistake, the traceback for a bug: shared by every command.

A command's failure is reported as ``error: <what>`` on stderr and an exit status:

- 2 (:data:`EXIT_USAGE`) for a usage error: a bad flag, value, config field or input (the line
  names the value, what is allowed and, when one is close, what was probably meant);
- 1 (:data:`EXIT_FAILURE`) for a run that could not complete (every checkpoint damaged, a
  non-finite loss, a file that cannot be read or written).

What counts as the user's mistake: :class:`UsageError` and :class:`RunFailureError` anywhere,
absl's flag errors, and a ``ValueError`` (or ``OSError``, ``FloatingPointError``) raised on
purpose by jaxbased's own code (its innermost frame is in a module listed in
``user_error_modules``). Anything else (a ``ValueError`` from inside JAX, a ``TypeError``, a
``KeyError``...) is a bug and keeps its traceback. ``--verbose`` or ``JAXBASED_DEBUG=1`` shows
the traceback of every error.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import sys
import traceback
from collections.abc import Iterable, Sequence

EXIT_USAGE = 2
EXIT_FAILURE = 1
DEBUG_ENVIRONMENT_VARIABLE = "JAXBASED_DEBUG"
PACKAGE_DIRECTORY = pathlib.Path(__file__).resolve().parents[1]
MAX_LISTED = 40


class UsageError(ValueError):
    """A bad flag, value or input (exit status 2)."""


class RunFailureError(RuntimeError):
    """A run that could not complete for a reason the user can act on (exit status 1)."""


def did_you_mean(value: str, allowed: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'workdir'?"`` for the closest of ``allowed``, or ``""``."""
    matches = difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{matches[0]}?" if matches else ""


def listing(values: Iterable[str], prefix: str = "") -> str:
    """``a, b, c`` (the first :data:`MAX_LISTED`, then how many more)."""
    values = list(values)
    shown = ", ".join(f"{prefix}{value}" for value in values[:MAX_LISTED])
    more = len(values) - MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def unknown_name(kind: str, value: str, allowed: Sequence[str], prefix: str = "") -> UsageError:
    """``unknown flag --wrkdir; did you mean --workdir? (allowed: --workdir, ...)``."""
    return UsageError(
        f"unknown {kind} {prefix}{value}{did_you_mean(value, allowed, prefix)} "
        f"(allowed: {listing(allowed, prefix)})"
    )


def check_model_source(workdir: str | None, checkpoint: str | None) -> None:
    """Usage errors for a command that loads a model from exactly one of ``--workdir`` (a train.py
    or jaxbased-convert workdir, which holds ``checkpoints/``, or a jaxbased-quantize one, which
    holds ``quantized/quantization.json``) or ``--checkpoint`` (a folder)."""
    if (workdir is None) == (checkpoint is None):
        raise UsageError("give exactly one of --workdir or --checkpoint")
    quantized = (pathlib.Path(workdir or "") / "quantized" / "quantization.json").is_file()
    if (
        workdir is not None
        and not quantized
        and not (pathlib.Path(workdir) / "checkpoints").is_dir()
    ):
        raise UsageError(
            f"--workdir={workdir} holds no checkpoints/ folder (not a train.py, "
            "jaxbased-convert or jaxbased-quantize workdir)"
        )
    if checkpoint is not None and not pathlib.Path(checkpoint).is_dir():
        raise UsageError(f"--checkpoint={checkpoint} is not a folder")


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--verbose`` on the command line or ``JAXBASED_DEBUG`` set to a true value."""
    argv = sys.argv if argv is None else argv
    environment = os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "").strip().lower()
    if environment not in ("", "0", "false", "no"):
        return True
    return any(argument in ("--verbose", "--verbose=true", "--verbose=1") for argument in argv)


def one_line(message: str) -> str:
    """The message on one line (its lines joined with spaces)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _raised_in(error: BaseException, modules: Sequence[pathlib.Path]) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return True  # raised before any frame ran here: a flag parser's own error
    filename = pathlib.Path(frames[-1].filename).resolve()
    return any(filename.is_relative_to(module) for module in modules)


def exit_status(
    error: BaseException, user_error_modules: Sequence[pathlib.Path] = (PACKAGE_DIRECTORY,)
) -> int | None:
    """The exit status of a user's mistake (2 or 1), or None for a bug (keeps its traceback)."""
    from absl import flags

    if isinstance(error, UsageError | flags.Error):
        return EXIT_USAGE
    if isinstance(error, RunFailureError):
        return EXIT_FAILURE
    if type(error).__name__ == "UsageError":  # absl.app.UsageError
        return EXIT_USAGE
    if not _raised_in(error, user_error_modules):
        return None
    if isinstance(error, ValueError):
        return EXIT_USAGE
    if isinstance(error, OSError | FloatingPointError):
        return EXIT_FAILURE
    return None


def report(
    error: BaseException,
    *,
    verbose: bool,
    user_error_modules: Sequence[pathlib.Path] = (PACKAGE_DIRECTORY,),
) -> int:
    """Print ``error`` (one line, or the traceback for a bug or when verbose); its exit status."""
    if isinstance(error, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    status = exit_status(error, user_error_modules)
    if status is None or verbose:
        traceback.print_exception(error)
        return EXIT_FAILURE if status is None else status
    message = one_line(str(error)) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    print(f"error: {message}", file=sys.stderr)
    if status == EXIT_FAILURE:
        print(f"(--verbose or {DEBUG_ENVIRONMENT_VARIABLE}=1 shows the traceback)", file=sys.stderr)
    sys.stderr.flush()
    return status
