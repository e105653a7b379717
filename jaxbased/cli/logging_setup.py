"""Log set-up shared by the entry points: INFO to stderr, Orbax's per-file chatter hidden."""

from __future__ import annotations

import logging as python_logging

from absl import logging


class _QuietLibraries(python_logging.Filter):
    """Drops INFO/DEBUG records emitted from Orbax's and Grain's own files."""

    NOISY = ("/orbax/", "/grain/")

    def filter(self, record: python_logging.LogRecord) -> bool:
        if record.levelno >= python_logging.WARNING:
            return True
        return not any(part in record.pathname for part in self.NOISY)


def configure_logging() -> None:
    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(_QuietLibraries())
