"""Log set-up shared by the entry points: INFO to stderr, library chatter hidden.

Hidden: Orbax's and Grain's per-file INFO records, and JAX's INFO records about backends it
could not start (``Unable to initialize backend 'tpu'`` when a libtpu or CUDA plugin is present
without its hardware): JAX then runs on the backends it has, so the line is noise to a user.
"""

from __future__ import annotations

import logging as python_logging

from absl import logging


class QuietLibraries(python_logging.Filter):
    """Drops INFO/DEBUG records emitted from Orbax's and Grain's own files and JAX's notes on
    backends that did not start."""

    NOISY = ("/orbax/", "/grain/")
    NOISY_MESSAGES = ("Unable to initialize backend", "Platform 'tpu'", "libtpu")
    # Orbax's warning on a step folder without its metadata file: the checkpointer's own
    # warning names the damaged step and the step used instead.
    ORBAX_DAMAGE_MESSAGES = ("Metadata file does not exist",)

    def filter(self, record: python_logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(part in record.pathname for part in self.NOISY):
            if any(part in message for part in self.ORBAX_DAMAGE_MESSAGES):
                return False
            return record.levelno >= python_logging.WARNING
        if record.levelno >= python_logging.WARNING and not record.name.startswith("jax._src"):
            return True
        return not any(part in message for part in self.NOISY_MESSAGES)


def configure_logging() -> None:
    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(QuietLibraries())
