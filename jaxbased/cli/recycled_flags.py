"""The ``--recycled_*`` flags of ``jaxbased-generate`` and ``jaxbased-serve``, and the
``RecycledAttentionPolicy`` they describe.

Importing this module defines no flag: a command calls :func:`define_flags` (once or more; the
flags are defined on the first call), so that the translation from flag values to a policy,
and its error messages, can be used and tested on their own.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from absl import flags

from jaxbased.cli import errors

if TYPE_CHECKING:
    from jaxbased.ops.recycled_attention import RecycledAttentionPolicy

#: The flag names, in the order of a command's help group.
FLAG_NAMES: tuple[str, ...] = (
    "recycled_top_k",
    "recycled_stride",
    "recycled_similarity_threshold",
    "recycled_check_every",
    "recycled_head_selection",
    "recycled_pool_size",
)


def policy_from_flag_values(
    top_k: int,
    stride: int = 10,
    similarity_threshold: float | None = None,
    check_every: int = 5,
    head_selection: str = "group_max",
    pool_size: int = 5,
) -> RecycledAttentionPolicy | None:
    """The policy of these ``--recycled_<field>`` values; None when ``top_k`` is 0 (off).

    A bad value is a ``UsageError`` that names its flag, e.g.
    ``--recycled_stride=0 must be an integer >= 1``.
    """
    if top_k == 0:
        return None
    if top_k < 0:
        raise errors.UsageError(
            f"--recycled_top_k={top_k} must be >= 1 (0: Recycled Attention off)"
        )
    from jaxbased.ops.recycled_attention import RecycledAttentionPolicy

    try:
        return RecycledAttentionPolicy(
            top_k=top_k,
            stride=stride,
            similarity_threshold=similarity_threshold,
            check_every=check_every,
            head_selection=head_selection,
            pool_size=pool_size,
        )
    except ValueError as error:  # the message starts with the field name
        raise errors.UsageError(f"--recycled_{error}") from error


@dataclasses.dataclass(frozen=True)
class RecycledFlags:
    """The holders of the six ``--recycled_*`` flags (see :data:`FLAG_NAMES`)."""

    top_k: flags.FlagHolder
    stride: flags.FlagHolder
    similarity_threshold: flags.FlagHolder
    check_every: flags.FlagHolder
    head_selection: flags.FlagHolder
    pool_size: flags.FlagHolder

    def policy(self) -> RecycledAttentionPolicy | None:
        """The policy of the parsed flags (None when ``--recycled_top_k=0``); a usage error
        naming the flag of a bad value."""
        return policy_from_flag_values(
            top_k=self.top_k.value,
            stride=self.stride.value,
            similarity_threshold=self.similarity_threshold.value,
            check_every=self.check_every.value,
            head_selection=self.head_selection.value,
            pool_size=self.pool_size.value,
        )


_DEFINED: list[RecycledFlags] = []


def define_flags() -> RecycledFlags:
    """Define the ``--recycled_*`` flags (on the first call; later calls return the same
    holders) with the defaults of :func:`policy_from_flag_values`."""
    if not _DEFINED:
        _DEFINED.append(
            RecycledFlags(
                top_k=flags.DEFINE_integer(
                    "recycled_top_k",
                    0,
                    "Recycled Attention: keys per head on a recycled step (0: off)",
                ),
                stride=flags.DEFINE_integer(
                    "recycled_stride",
                    10,
                    "Recycled Attention: a full-attention step every this many tokens",
                ),
                similarity_threshold=flags.DEFINE_float(
                    "recycled_similarity_threshold",
                    None,
                    "Recycled Attention: also a full step when the query's cosine similarity to "
                    "the last full step's query falls below this, in [-1, 1] (default: off)",
                ),
                check_every=flags.DEFINE_integer(
                    "recycled_check_every",
                    5,
                    "Recycled Attention: steps between two similarity checks",
                ),
                head_selection=flags.DEFINE_string(
                    "recycled_head_selection",
                    "group_max",
                    "Recycled Attention: how the kept keys are chosen: group_max, first_head or "
                    "recent",
                ),
                pool_size=flags.DEFINE_integer(
                    "recycled_pool_size",
                    5,
                    "Recycled Attention: group_max's max-pool width in positions (odd)",
                ),
            )
        )
    return _DEFINED[0]
