"""Float64 NumPy references written from docs/, independent of the library's code.

Everything here uses plain loops or explicit masks so that it is easy to check by eye against
docs/model.md and docs/mixers/; speed does not matter.
"""

from __future__ import annotations

import math

import numpy as np


# Feature maps (docs/mixers/based.md) -------------------------------------------------------------
def phi(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    feature_dim = x.shape[-1]
    if name == "taylor":
        outer = np.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], feature_dim**2)
        return np.concatenate(
            [
                np.ones((*x.shape[:-1], 1)),
                x / feature_dim**0.25,
                outer / (math.sqrt(2) * math.sqrt(feature_dim)),
            ],
            axis=-1,
        )
    if name == "taylor_symmetric":
        pieces = [np.ones((*x.shape[:-1], 1)), x / feature_dim**0.25]
        for i in range(feature_dim):
            for j in range(i, feature_dim):
                scale = (
                    1 / (math.sqrt(2) * math.sqrt(feature_dim))
                    if i == j
                    else 1 / math.sqrt(feature_dim)
                )
                pieces.append((x[..., i] * x[..., j] * scale)[..., None])
        return np.concatenate(pieces, axis=-1)
    if name == "elu":
        return np.where(x > 0, x + 1.0, np.exp(x))
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "identity":
        return x
    raise ValueError(name)


def linear_attention(q, k, v, feature_map="taylor", eps=1e-12, kv_state=None, k_state=None):
    """Token-by-token sums from the definition: q, k [B, T, H, F], v [B, T, H, Dv].

    Returns y [B, T, H, Dv] and the final (kv_state [B, H, D', Dv], k_state [B, H, D']).
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    phi_q, phi_k = phi(q, feature_map), phi(k, feature_map)
    batch, seq, heads, _ = q.shape
    expanded, value_dim = phi_q.shape[-1], v.shape[-1]
    kv = np.zeros((batch, heads, expanded, value_dim)) if kv_state is None else kv_state.copy()
    z = np.zeros((batch, heads, expanded)) if k_state is None else k_state.copy()
    kv0, z0 = kv.copy(), z.copy()
    y = np.zeros((batch, seq, heads, value_dim))
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                numerator = phi_q[b, i, h] @ kv0[b, h]
                denominator = phi_q[b, i, h] @ z0[b, h]
                for j in range(i + 1):
                    kernel = phi_q[b, i, h] @ phi_k[b, j, h]
                    numerator = numerator + kernel * v[b, j, h]
                    denominator = denominator + kernel
                y[b, i, h] = numerator / (denominator + eps)
    kv = kv + np.einsum("bthf,bthd->bhfd", phi_k, v)
    z = z + phi_k.sum(1)
    return y, (kv, z)


# Softmax attention -----------------------------------------------------------------------------
def window_attention(q, k, v, window, scale=None):
    """Masked softmax: query i sees keys j with i - window < j <= i (all j <= i if None)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    seq, head_dim = q.shape[1], q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    scores = np.einsum("bihd,bjhd->bhij", q, k) * scale
    i = np.arange(seq)[:, None]
    j = np.arange(seq)[None, :]
    mask = j <= i
    if window is not None:
        mask &= i - j < window
    scores = np.where(mask, scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", weights, v)


def rotary(x, positions, rotary_dim, base=10000.0):
    """NeoX-halves rotary on the first 2*ceil(r/2) channels: x [B, T, H, D], positions [T]."""
    x = np.asarray(x, np.float64)
    inv_freq = 1.0 / base ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    half = len(inv_freq)
    out = x.copy()
    for t, position in enumerate(positions):
        angle = position * inv_freq
        x1, x2 = x[:, t, :, :half], x[:, t, :, half : 2 * half]
        out[:, t, :, :half] = x1 * np.cos(angle) - x2 * np.sin(angle)
        out[:, t, :, half : 2 * half] = x2 * np.cos(angle) + x1 * np.sin(angle)
    return out


# Short conv ------------------------------------------------------------------------------------
def short_conv(x, weight):
    """y[t, c] = sum_j weight[j, c] * x[t - K + 1 + j, c], zeros before the start."""
    x = np.asarray(x, np.float64)
    kernel_size = weight.shape[0]
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(kernel_size):
            source = t - kernel_size + 1 + j
            if source >= 0:
                y[:, t] += weight[j] * x[:, source]
    return y


# The whole language model (docs/model.md), from a parameter dict -------------------------------
def silu(x):
    return x / (1.0 + np.exp(-x))


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * weight


def layer_norm(x, weight, bias, eps):
    centered = x - x.mean(-1, keepdims=True)
    return centered / np.sqrt(np.mean(centered**2, -1, keepdims=True) + eps) * weight + bias


def _norm(x, params, config):
    if config.norm == "layernorm":
        return layer_norm(x, params["weight"], params["bias"], config.norm_eps)
    return rms_norm(x, params["weight"], config.norm_eps)


def _linear(x, kernel, bias=None):
    y = np.tensordot(x, np.asarray(kernel, np.float64), axes=1)
    return y if bias is None else y + np.asarray(bias, np.float64)


def _flat_out(kernel):
    kernel = np.asarray(kernel, np.float64)
    return kernel.reshape(kernel.shape[0], -1)


def mixer_forward(name, params, x, config):
    batch, seq, d_model = x.shape
    if name == "base_conv":
        in_kernel = _flat_out(params["in_proj"]["kernel"])  # [d, 2C]: u1 columns then u2
        u = _linear(x, in_kernel, np.asarray(params["in_proj"]["bias"]).reshape(-1))
        channels = in_kernel.shape[1] // 2
        u1, u2 = u[..., :channels], u[..., channels:]
        conv = short_conv(u1, np.asarray(params["conv_weight"], np.float64))
        return _linear(silu(conv) * u2, params["out_proj"]["kernel"], params["out_proj"]["bias"])
    if name == "based":
        section = config.based
        heads, feature_dim = section.heads, section.feature_dim
        q = _linear(x, _flat_out(params["proj_q"]["kernel"])).reshape(
            batch, seq, heads, feature_dim
        )
        k = _linear(x, _flat_out(params["proj_k"]["kernel"])).reshape(
            batch, seq, heads, feature_dim
        )
        v = _linear(x, _flat_out(params["proj_v"]["kernel"])).reshape(batch, seq, heads, -1)
        y, _ = linear_attention(q, k, v, section.feature_map, section.eps)
        out_kernel = np.asarray(params["out_proj"]["kernel"], np.float64).reshape(-1, d_model)
        return _linear(y.reshape(batch, seq, -1), out_kernel)
    if name in ("sliding_window", "attention"):
        section = getattr(config, name)
        heads, rotary_dim = section.heads, section.rotary_dim(d_model)
        qkv = _linear(x, _flat_out(params["qkv_proj"]["kernel"]))  # columns [Q | K | V]
        q, k, v = (part.reshape(batch, seq, heads, -1) for part in np.split(qkv, 3, axis=-1))
        if rotary_dim:
            q = rotary(q, range(seq), rotary_dim, section.rotary_base)
            k = rotary(k, range(seq), rotary_dim, section.rotary_base)
        window = section.window
        y = window_attention(q, k, v, window)
        out_kernel = np.asarray(params["out_proj"]["kernel"], np.float64).reshape(-1, d_model)
        return _linear(y.reshape(batch, seq, -1), out_kernel)
    raise ValueError(name)


def model_forward(params, tokens, config):
    """Logits [B, T, V] of the language model, float64."""
    embedding = np.asarray(params["embedding"], np.float64)
    x = embedding[np.asarray(tokens)]
    for i, name in enumerate(config.layer_pattern):
        layer = params[f"layers_{i}"]
        x = x + mixer_forward(name, layer["mixer"], _norm(x, layer["norm1"], config), config)
        if not config.use_mlp:
            assert "mlp" not in layer and "norm2" not in layer
            continue
        normed = _norm(x, layer["norm2"], config)
        both = _linear(normed, _flat_out(layer["mlp"]["fc1"]["kernel"]))
        hidden = both.shape[-1] // 2
        value, gate = both[..., :hidden], both[..., hidden:]
        x = x + _linear(value * silu(gate), layer["mlp"]["fc2"]["kernel"])
    x = _norm(x, params["final_norm"], config)
    return x @ embedding.T


def shared_attention_model_forward(params, tokens, config):
    """EchoAtt (a Transformer++ with RMSNorm and a gated MLP, every layer full attention):
    logits ``[B, T, V]`` in float64, where a sharing layer ``j`` with anchor ``a`` outputs
    ``out_proj_j(P_a · v_proj_j(x))``, ``P_a`` the anchor's causal softmax; and every layer's
    probabilities ``{layer: [B, H, T, T]}`` (a sharing layer's are its anchor's)."""
    anchors = config.attention_anchors
    section = config.attention
    embedding = np.asarray(params["embedding"], np.float64)
    x = embedding[tokens]
    batch, seq, d_model = x.shape
    heads, rotary_dim = section.heads, section.rotary_dim(d_model)
    causal = np.tril(np.ones((seq, seq), bool))
    probabilities = {}
    for i in range(config.num_layers):
        layer = params[f"layers_{i}"]
        mixer = layer["mixer"]
        h = rms_norm(x, np.asarray(layer["norm1"]["weight"], np.float64), config.norm_eps)
        if i in anchors:
            v = _linear(h, _flat_out(mixer["v_proj"]["kernel"]))
            v = v.reshape(batch, seq, heads, -1)
            p = probabilities[anchors[i]]
        else:
            qkv = _linear(h, _flat_out(mixer["qkv_proj"]["kernel"]))
            q, k, v = (part.reshape(batch, seq, heads, -1) for part in np.split(qkv, 3, -1))
            if rotary_dim:
                q = rotary(q, range(seq), rotary_dim, section.rotary_base)
                k = rotary(k, range(seq), rotary_dim, section.rotary_base)
            scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
            scores = np.where(causal, scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
        probabilities[i] = p
        y = np.einsum("bhij,bjhd->bihd", p, v).reshape(batch, seq, -1)
        out_kernel = np.asarray(mixer["out_proj"]["kernel"], np.float64).reshape(-1, d_model)
        x = x + _linear(y, out_kernel)
        normed = rms_norm(x, np.asarray(layer["norm2"]["weight"], np.float64), config.norm_eps)
        both = _linear(normed, _flat_out(layer["mlp"]["fc1"]["kernel"]))
        value, gate = np.split(both, 2, -1)
        x = x + _linear(value * silu(gate), layer["mlp"]["fc2"]["kernel"])
    x = rms_norm(x, np.asarray(params["final_norm"]["weight"], np.float64), config.norm_eps)
    return x @ embedding.T, probabilities


# Decay linear attention, SSD (Mamba-2) and the selective scan (Mamba-1) ------------------------
def decayed_linear_attention(
    q, k, v, log_decay, feature_map="taylor", normalize=True, eps=1e-12, kv_state=None, k_state=None
):
    """The recurrence token by token, per batch and head, with a_t = exp(log_decay_t):
    S_t = a_t S_{t-1} + phi(k_t) v_t^T, z_t = a_t z_{t-1} + phi(k_t),
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps), or phi(q_t)^T S_t without normalize.

    log_decay: None (a_t = 1), [H] or [B, T, H]. Returns y [B, T, H, Dv] and (S, z).
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    phi_q, phi_k = phi(q, feature_map), phi(k, feature_map)
    batch, seq, heads, _ = q.shape
    log_decay = np.zeros((heads,)) if log_decay is None else np.asarray(log_decay, np.float64)
    log_decay = np.broadcast_to(log_decay, (batch, seq, heads))
    expanded, value_dim = phi_q.shape[-1], v.shape[-1]
    kv = np.zeros((batch, heads, expanded, value_dim)) if kv_state is None else kv_state.copy()
    z = np.zeros((batch, heads, expanded)) if k_state is None else k_state.copy()
    kv, z = np.array(kv, np.float64), np.array(z, np.float64)
    y = np.zeros((batch, seq, heads, value_dim))
    for b in range(batch):
        for h in range(heads):
            for t in range(seq):
                decay = math.exp(log_decay[b, t, h])
                kv[b, h] = decay * kv[b, h] + np.outer(phi_k[b, t, h], v[b, t, h])
                z[b, h] = decay * z[b, h] + phi_k[b, t, h]
                numerator = phi_q[b, t, h] @ kv[b, h]
                y[b, t, h] = (
                    numerator / (phi_q[b, t, h] @ z[b, h] + eps) if normalize else numerator
                )
    return y, (kv, z)


def ssd(x, dt, a, b, c, initial_state=None):
    """Mamba-2's scan token by token: x [B, T, H, P], dt [B, T, H], a [H], b, c [B, T, G, N];
    head h reads group h // (H // G). h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t^T ([P, N]),
    y_t = h_t c_t. Returns y [B, T, H, P] and the final state [B, H, P, N]."""
    x, dt, a, b, c = (np.asarray(arr, np.float64) for arr in (x, dt, a, b, c))
    batch, seq, heads, head_dim = x.shape
    groups, state_dim = b.shape[2], b.shape[3]
    state = np.zeros((batch, heads, head_dim, state_dim))
    if initial_state is not None:
        state = np.array(initial_state, np.float64)
    y = np.zeros_like(x)
    for n in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            for t in range(seq):
                state[n, h] = math.exp(dt[n, t, h] * a[h]) * state[n, h] + dt[n, t, h] * np.outer(
                    x[n, t, h], b[n, t, g]
                )
                y[n, t, h] = state[n, h] @ c[n, t, g]
    return y, state


def selective_scan(u, delta, a, b, c, initial_state=None):
    """Mamba-1's scan token by token: u, delta [B, T, D], a [D, N], b, c [B, T, N].
    h_t[d, n] = exp(delta_t[d] a[d, n]) h_{t-1}[d, n] + delta_t[d] u_t[d] b_t[n],
    y_t[d] = sum_n h_t[d, n] c_t[n]. Returns y [B, T, D] and the final state [B, D, N]."""
    u, delta, a, b, c = (np.asarray(arr, np.float64) for arr in (u, delta, a, b, c))
    batch, seq, channels = u.shape
    state = np.zeros((batch, channels, a.shape[1]))
    if initial_state is not None:
        state = np.array(initial_state, np.float64)
    y = np.zeros_like(u)
    for n in range(batch):
        for t in range(seq):
            for d in range(channels):
                state[n, d] = np.exp(delta[n, t, d] * a[d]) * state[n, d] + (
                    delta[n, t, d] * u[n, t, d] * b[n, t]
                )
                y[n, t, d] = state[n, d] @ c[n, t]
    return y, state
