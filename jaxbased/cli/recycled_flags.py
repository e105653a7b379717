"""The ``RecycledAttentionPolicy`` that ``jaxbased-generate``'s ``--recycled_*`` flags describe.

Kept apart from ``jaxbased.cli.generate`` (which defines absl flags when imported) so that the
translation from flag values to a policy, and its error messages, can be used and tested on
their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxbased.cli import errors

if TYPE_CHECKING:
    from jaxbased.ops.recycled_attention import RecycledAttentionPolicy


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
