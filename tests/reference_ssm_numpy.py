"""Float64 NumPy forwards of the state-space and decay mixers, written from docs/mixers/ and the
module docstrings (token-by-token recurrences, no shared code with jaxbased)."""

from __future__ import annotations

import importlib

import numpy as np

from tests import reference_numpy as ref


def _array(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def depthwise_causal_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``y[t, c] = bias[c] + sum_j weight[j, c] x[t - K + 1 + j, c]`` over ``x [B, T, C]``."""
    kernel_size, seq = weight.shape[0], x.shape[1]
    y = np.zeros_like(x) + bias
    for t in range(seq):
        for j in range(kernel_size):
            source = t - kernel_size + 1 + j
            if source >= 0:
                y[:, t] += weight[j] * x[:, source]
    return y


def mamba_forward(params, x, config) -> np.ndarray:
    """Mamba-1 block (docs/mixers/mamba.md) on ``x [B, T, d]``, float64."""
    x = _array(x)
    section, d = config.mamba, config.d_model
    inner, rank, state = section.inner_dim(d), section.time_step_rank(d), section.state_dim
    in_kernel = _array(params["in_proj"]["kernel"]).reshape(x.shape[-1], 2 * inner)
    projected = x @ in_kernel
    conv_input, gate = projected[..., :inner], projected[..., inner:]
    u = ref.silu(
        depthwise_causal_conv(
            conv_input, _array(params["conv_weight"]), _array(params["conv_bias"])
        )
    )
    selection = u @ _array(params["x_proj"]["kernel"])
    dt_low, b, c = (
        selection[..., :rank],
        selection[..., rank : rank + state],
        selection[..., rank + state :],
    )
    delta = softplus(dt_low @ _array(params["dt_proj_kernel"]) + _array(params["dt_bias"]))
    a = -np.exp(_array(params["A_log"]))  # [inner, N]
    batch, seq = x.shape[:2]
    h = np.zeros((batch, inner, state))
    y = np.zeros((batch, seq, inner))
    for t in range(seq):
        h = (
            np.exp(delta[:, t, :, None] * a) * h
            + (delta[:, t] * u[:, t])[:, :, None] * b[:, t, None, :]
        )
        y[:, t] = np.einsum("bdn,bn->bd", h, c[:, t])
    y = (y + _array(params["D"]) * u) * ref.silu(gate)
    return y @ _array(params["out_proj"]["kernel"])


def mamba2_forward(params, x, config) -> np.ndarray:
    """Mamba-2 block (docs/mixers/mamba2.md) on ``x [B, T, d]``, float64."""
    x = _array(x)
    section, d = config.mamba2, config.d_model
    inner, heads, head_dim = section.inner_dim(d), section.heads(d), section.head_dim
    groups, state = section.groups, section.state_dim
    channels = inner + 2 * groups * state
    projected = x @ _array(params["in_proj"]["kernel"])
    gate = projected[..., :inner]
    xbc = projected[..., inner : inner + channels]
    dt = projected[..., inner + channels :]
    xbc = ref.silu(
        depthwise_causal_conv(xbc, _array(params["conv_weight"]), _array(params["conv_bias"]))
    )
    batch, seq = x.shape[:2]
    xs = xbc[..., :inner].reshape(batch, seq, heads, head_dim)
    b = xbc[..., inner : inner + groups * state].reshape(batch, seq, groups, state)
    c = xbc[..., inner + groups * state :].reshape(batch, seq, groups, state)
    dt = softplus(dt + _array(params["dt_bias"]))  # [B, T, H]
    a = -np.exp(_array(params["A_log"]))  # [H]
    group_of_head = np.arange(heads) // (heads // groups)
    h = np.zeros((batch, heads, head_dim, state))
    y = np.zeros((batch, seq, heads, head_dim))
    for t in range(seq):
        bt, ct = b[:, t, group_of_head], c[:, t, group_of_head]  # [B, H, N]
        h = np.exp(dt[:, t] * a)[:, :, None, None] * h + np.einsum(
            "bh,bhp,bhn->bhpn", dt[:, t], xs[:, t], bt
        )
        y[:, t] = np.einsum("bhpn,bhn->bhp", h, ct)
    y = y + _array(params["D"])[:, None] * xs
    gated = y.reshape(batch, seq, inner) * ref.silu(gate)
    grouped = gated.reshape(batch, seq, groups, inner // groups)
    normed = grouped / np.sqrt(np.mean(grouped**2, axis=-1, keepdims=True) + config.norm_eps)
    normed = normed.reshape(batch, seq, inner) * _array(params["norm_weight"])
    return normed @ _array(params["out_proj"]["kernel"])


def retnet_decays(num_heads: int) -> np.ndarray:
    """RetNet's per-head decay ``gamma_h = 1 - 2^(-5 - h)``."""
    return 1.0 - 2.0 ** (-5.0 - np.arange(num_heads))


def decay_attention_forward(params, x, config) -> np.ndarray:
    """Retention with fixed per-head decays, no normalizer, per-head RMSNorm, SiLU gate."""
    x = _array(x)
    batch, seq = x.shape[:2]
    section = config.decay_attention
    heads, key_dim = section.heads, section.head_key_dim(config.d_model)

    def project(name):
        kernel = _array(params[name]["kernel"])
        return np.einsum("btd,dhf->bthf", x, kernel)

    q = ref.phi(project("proj_q"), section.feature_map)
    k = ref.phi(project("proj_k") / np.sqrt(key_dim), section.feature_map)
    v = project("proj_v")
    gamma = retnet_decays(heads)
    state = np.zeros((batch, heads, q.shape[-1], v.shape[-1]))
    out = np.zeros_like(v)
    for t in range(seq):
        state = gamma[None, :, None, None] * state + np.einsum("bhf,bhd->bhfd", k[:, t], v[:, t])
        out[:, t] = np.einsum("bhf,bhfd->bhd", q[:, t], state)
    normed = out / np.sqrt(np.mean(out**2, axis=-1, keepdims=True) + config.norm_eps)
    normed = normed * _array(params["norm_weight"])
    if section.output_gate:
        normed = normed * ref.silu(project("proj_gate"))
    return np.einsum("bthd,hde->bte", normed, _array(params["out_proj"]["kernel"]))


def mlp_forward(params, x, config) -> np.ndarray:
    """The gated MLP (docs/mixers/mlp.md) as a layer's mixer."""
    x = _array(x)
    fc1 = _array(params["fc1"]["kernel"])
    both = x @ fc1.reshape(fc1.shape[0], -1)
    hidden = both.shape[-1] // 2
    return (both[..., :hidden] * ref.silu(both[..., hidden:])) @ _array(params["fc2"]["kernel"])


FORWARDS = {
    "mamba": mamba_forward,
    "mamba2": mamba2_forward,
    "decay_attention": decay_attention_forward,
    "mlp": mlp_forward,
}


#: Mixers whose float64 forward lives in ``reference_numpy``.
_ATTENTION_AND_CONV = ("base_conv", "based", "sliding_window", "attention")


def mixer_forward(name, params, x, config) -> np.ndarray:
    """Any mixer: the state-space / decay ones here, the attention and conv ones from
    ``reference_numpy``; a mixer added later brings its own as ``numpy_forward(params, x,
    config)`` in its test file ``tests/test_<name>.py`` (docs/adding_a_mixer.md)."""
    if name in FORWARDS:
        return FORWARDS[name](params, x, config)
    if name in _ATTENTION_AND_CONV:
        return ref.mixer_forward(name, params, x, config)
    module = importlib.import_module(f"tests.test_{name}")
    if not hasattr(module, "numpy_forward"):
        raise AssertionError(f"tests/test_{name}.py defines no numpy_forward(params, x, config)")
    return module.numpy_forward(params, x, config)


def model_forward(params, tokens, config) -> np.ndarray:
    """Logits ``[B, T, V]`` of a language model whose pattern may use any mixer, float64."""
    embedding = _array(params["embedding"])
    x = embedding[np.asarray(tokens)]
    for i, name in enumerate(config.layer_pattern):
        layer = params[f"layers_{i}"]
        x = x + mixer_forward(name, layer["mixer"], ref._norm(x, layer["norm1"], config), config)
        if config.use_mlp:
            x = x + mlp_forward(layer["mlp"], ref._norm(x, layer["norm2"], config), config)
    return ref._norm(x, params["final_norm"], config) @ embedding.T
