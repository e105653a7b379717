"""What every command shares: its ``--help``, flag parsing with one-line errors, and running.

A command describes itself with a :class:`Command` (what it does, examples, its flags in
groups) and hands its ``main`` to :func:`run`, which

- prints the command's own help for ``--help`` / ``-h`` / ``--helpshort`` (absl's internal
  flags only under ``--helpfull``) and exits 0;
- checks ``--config.SECTION.FIELD=VALUE`` overrides against the config file's fields (an
  unknown field is named with the fields allowed and the closest one) before absl parses them;
- parses the flags, reporting a bad flag or value in one line with exit status 2;
- keeps freed host memory for reuse (:mod:`jaxbased.host_memory`; ``JAXBASED_HOST_MALLOC=system``
  leaves the C allocator as it is);
- runs ``main`` and reports a failure as :mod:`jaxbased.cli.errors` says (one line for the
  user's mistakes, the traceback for bugs or under ``--verbose`` / ``JAXBASED_DEBUG=1``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import textwrap
from collections.abc import Callable, Sequence

from absl import flags
from ml_collections.config_flags.config_flags import is_config_flag

from jaxbased.cli import errors
from jaxbased.cli.logging_setup import configure_logging
from jaxbased.host_memory import apply_host_malloc_policy

_VERBOSE = flags.DEFINE_bool(
    "verbose",
    False,
    f"show the traceback of any error (also {errors.DEBUG_ENVIRONMENT_VARIABLE}=1)",
)
HELP_FLAGS = ("--help", "-h", "--helpshort", "-help", "-?")
FULL_HELP_FLAGS = ("--helpfull", "-helpfull")
CONFIG_OVERRIDE_NOTE = (
    "--{name}.SECTION.FIELD=VALUE sets any field of the config file (unknown fields are refused), "
    "e.g. --{name}.train.num_steps=500; the sections: {sections}"
)


@dataclasses.dataclass(frozen=True)
class Command:
    """A command's help: ``name``, a one-line ``summary``, ``usage``, ``examples``, free
    ``notes`` and its flags in ``groups`` (title, flag names); ``required`` flags are marked."""

    name: str
    summary: str
    usage: str
    examples: tuple[str, ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    notes: str = ""
    required: tuple[str, ...] = ()
    config_flag: str | None = None
    config_default: str | None = None

    def flag_names(self) -> list[str]:
        return [name for _, names in self.groups for name in names] + ["verbose"]


def _default_text(flag: flags.Flag) -> str:
    if isinstance(flag.default, bool):
        return "true" if flag.default else "false"
    if isinstance(flag.default, list):
        return ",".join(str(value) for value in flag.default)
    if is_config_flag(flag):
        return str(flag.default_as_str).strip("'")
    if flag.default is None:
        return "none"
    return str(flag.default)


def _flag_help(flag: flags.Flag, required: bool, default: str | None = None) -> str:
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    default = "required" if required else f"default: {default or _default_text(flag)}"
    choices = getattr(flag.parser, "enum_values", None)
    allowed = f"; one of {', '.join(choices)}" if choices else ""
    body = textwrap.fill(
        f"{flag.help}{allowed}", width=96, initial_indent="      ", subsequent_indent="      "
    )
    return f"  {name} ({default})\n{body}"


def help_text(command: Command) -> str:
    """The command's ``--help``: what it does, usage, examples, notes, its flags by group."""
    values = flags.FLAGS
    parts = [f"{command.name}: {command.summary}", f"usage: {command.usage}", "examples:"]
    parts[-1] += "".join(f"\n  {example}" for example in command.examples)
    if command.notes:
        parts.append(textwrap.fill(" ".join(command.notes.split()), width=100))
    for title, names in command.groups:
        lines = [f"{title}:"]
        for name in names:
            default = command.config_default if name == command.config_flag else None
            lines.append(_flag_help(values[name], name in command.required, default))
        if command.config_flag is not None and command.config_flag in names:
            note = CONFIG_OVERRIDE_NOTE.format(
                name=command.config_flag, sections="model, data, train, mesh, sample"
            )
            lines.append(
                textwrap.fill(note, width=96, initial_indent="  ", subsequent_indent="      ")
            )
        parts.append("\n".join(lines))
    common = [
        "common:",
        _flag_help(values["verbose"], False),
        "  --help: this help; --helpfull: every flag, absl's own included",
    ]
    parts.append("\n".join(common))
    return "\n\n".join(parts) + "\n"


def _config_path(argv: Sequence[str], name: str) -> str | None:
    for index, argument in enumerate(argv):
        if argument.startswith(f"--{name}=") or argument.startswith(f"-{name}="):
            return argument.split("=", 1)[1]
        if argument in (f"--{name}", f"-{name}") and index + 1 < len(argv):
            return argv[index + 1]
    return None


def check_config_overrides(argv: Sequence[str], name: str) -> None:
    """Raise :class:`errors.UsageError` for a ``--NAME.a.b=v`` whose path is not a field of the
    config file (naming the fields of its section and the closest one)."""
    pattern = re.compile(rf"^--?(no)?{re.escape(name)}\.([^=]+)")
    overrides = [match.group(2) for match in map(pattern.match, argv[1:]) if match]
    if not overrides:
        return
    path = _config_path(argv, name)
    if path is None:
        raise errors.UsageError(f"--{name}.{overrides[0]} needs --{name}=<config file> first")
    config = flags.FLAGS[name].parser.parse(path)
    for override in overrides:
        node, done = config, []
        for part in override.split("."):
            key = part.split("[", 1)[0]
            if not hasattr(node, "keys"):
                raise errors.UsageError(
                    f"--{name}.{override}: {name}.{'.'.join(done)} is a value, not a section"
                )
            keys = sorted(node.keys())
            if key not in keys:
                section = ".".join([name, *done])
                raise errors.UsageError(
                    f"unknown config field --{section}.{key}"
                    f"{errors.did_you_mean(key, keys, f'--{section}.')} "
                    f"(the fields of {section}: {errors.listing(keys)})"
                )
            node, done = node[key], [*done, key]


def with_config_default(argv: list[str], command: Command) -> list[str]:
    """``argv`` with ``--CONFIG=<the command's default config file>`` when it names none.

    The config flag is defined without a default, so that importing a command never runs a
    config file (absl would parse the default, with the command line's overrides, at import).
    """
    name = command.config_flag
    if name is None or command.config_default is None or _config_path(argv, name) is not None:
        return argv
    return [argv[0], f"--{name}={command.config_default}", *argv[1:]]


def check_config_file(argv: Sequence[str], name: str) -> None:
    """A usage error when ``--NAME=FILE`` names no file."""
    path = _config_path(argv, name)
    if path is not None and not pathlib.Path(path.split(":", 1)[0]).is_file():
        raise errors.UsageError(
            f"--{name}={path}: no such config file (paths are relative to the current folder)"
        )


def parse_flags(argv: Sequence[str], command: Command) -> list[str]:
    """absl's parse of ``argv`` (the arguments left), every mistake as one UsageError."""
    if command.config_flag is not None:
        check_config_file(argv, command.config_flag)
        check_config_overrides(argv, command.config_flag)
    try:
        return flags.FLAGS(list(argv))
    except flags.UnrecognizedFlagError as error:
        raise errors.unknown_name("flag", error.flagname, command.flag_names(), "--") from error
    except flags.Error as error:
        message = errors.one_line(str(error))
        missing = re.search(r"Flag --(\w+) must have a value other than None", message)
        if missing:
            message = f"--{missing.group(1)} is required (see --help)"
        raise errors.UsageError(message) from error
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        # a config file that fails to load or an override ml_collections refuses
        raise errors.UsageError(errors.one_line(str(error)).strip("\"'")) from error


def run(
    main: Callable[[list[str]], None],
    command: Command,
    argv: Sequence[str] | None = None,
    user_error_modules: Sequence[pathlib.Path] = (errors.PACKAGE_DIRECTORY,),
) -> None:
    """Parse the flags and run ``main(arguments)``; exits with its status (see module doc)."""
    argv = list(sys.argv if argv is None else argv)
    arguments = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if any(argument in HELP_FLAGS for argument in arguments):
        sys.stdout.write(help_text(command))
        sys.exit(0)
    if any(argument in FULL_HELP_FLAGS for argument in arguments):
        sys.stdout.write(help_text(command) + "\nevery flag:\n" + flags.FLAGS.get_help() + "\n")
        sys.exit(0)
    verbose = errors.debug_requested(argv)
    argv = with_config_default(argv, command)
    sys.argv = argv  # ml_collections reads the config overrides from sys.argv
    try:
        remaining = parse_flags(argv, command)
        configure_logging()
        apply_host_malloc_policy()  # before JAX starts its backend and threads
        main(remaining)
    except SystemExit:
        raise
    except BaseException as error:  # reported, then the process exits
        sys.exit(errors.report(error, verbose=verbose, user_error_modules=user_error_modules))
    sys.exit(0)
