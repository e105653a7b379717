"""``train.profile_steps``: a ``jax.profiler`` trace of a range of training steps.

``--config.train.profile_steps=START,END`` traces steps ``START`` to ``END`` (inclusive, counted
from 1 like the logged steps) into ``<workdir>/profile/``; TensorBoard's profile plugin opens it
(``tensorboard --logdir <workdir>/profile``), as does Perfetto or XProf. The trace starts before
step ``START`` is dispatched and stops once step ``END``'s result is ready on the devices. An
empty string (the default) profiles nothing.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
from absl import logging

PROFILE_SUBDIR = "profile"


def parse_profile_steps(value: Any, num_steps: int) -> tuple[int, int] | None:
    """``(START, END)`` of ``train.profile_steps`` (``"START,END"``), or None for ``""``.

    Raises ``ValueError`` naming the value unless it is two integers with
    ``1 <= START < END <= num_steps``.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    allowed = (
        f"two integers START,END with 1 <= START < END <= train.num_steps={num_steps} "
        '(or "" for no profiling)'
    )
    parts = value.split(",") if isinstance(value, str) else None
    try:
        if parts is None or len(parts) != 2:
            raise ValueError
        start, end = (int(part.strip()) for part in parts)
    except ValueError:
        raise ValueError(f"train.profile_steps={value!r} must be {allowed}") from None
    if not 1 <= start < end <= num_steps:
        raise ValueError(f"train.profile_steps={value!r} must be {allowed}")
    return start, end


class StepProfiler:
    """Starts and stops the trace around the steps of ``steps`` (see the module docstring).

    A run resumed inside the range traces the rest of it; one resumed after it traces nothing.
    """

    def __init__(self, steps: tuple[int, int] | None, workdir: pathlib.Path) -> None:
        self.steps = steps
        self.directory = pathlib.Path(workdir) / PROFILE_SUBDIR
        self.active = False

    def before_step(self, step: int) -> None:
        """Call before dispatching step ``step`` (1-based)."""
        if self.steps is None or self.active:
            return
        start, end = self.steps
        if start <= step <= end:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True
            logging.info("profiling steps %d..%d into %s", step, end, self.directory)

    def after_step(self, step: int, result: Any) -> None:
        """Call after dispatching step ``step``; ``result`` is what it returned."""
        if self.active and step == self.steps[1]:
            jax.block_until_ready(result)
            self.stop()

    def stop(self) -> None:
        """Stop the trace if one is running (also on errors)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info("wrote the profile to %s", self.directory)
