"""Framework-free math of the mixers (docs/architecture.md, layer 2): pure functions on arrays.

Each op has an XLA reference (the source of truth) and its one-token decode step beside it.
"""

from jaxbased.ops.feature_maps import FEATURE_MAP_NAMES, expanded_dim, get_feature_map
from jaxbased.ops.linear_attention import (
    LinearAttentionState,
    discount_padding,
    init_linear_attention_state,
    linear_attention,
    linear_attention_step,
)
from jaxbased.ops.rotary import apply_rotary
from jaxbased.ops.selective_scan import selective_scan, selective_scan_step
from jaxbased.ops.short_conv import init_short_conv_state, short_conv, short_conv_step
from jaxbased.ops.ssd import ssd, ssd_step
from jaxbased.ops.window_attention import (
    KVCache,
    fill_kv_cache,
    init_kv_cache,
    sliding_window_attention,
    sliding_window_attention_step,
)

__all__ = [
    "FEATURE_MAP_NAMES",
    "KVCache",
    "LinearAttentionState",
    "apply_rotary",
    "discount_padding",
    "expanded_dim",
    "fill_kv_cache",
    "get_feature_map",
    "init_kv_cache",
    "init_linear_attention_state",
    "init_short_conv_state",
    "linear_attention",
    "linear_attention_step",
    "selective_scan",
    "selective_scan_step",
    "short_conv",
    "short_conv_step",
    "sliding_window_attention",
    "sliding_window_attention_step",
    "ssd",
    "ssd_step",
]
