"""An independent PyTorch forward of the BASED / Transformer++ language models, written from
docs/model.md, docs/mixers/ and docs/checkpoints.md (not from jaxbased's code), whose
``state_dict()`` has the released key layout. Tests save its random weights as a released
checkpoint, import them into jaxbased and compare logits.

The model is built from a ``config.json`` dict the way the released code reads one: a layer is
sliding-window attention if listed in ``alt_mixer_2_layers``, else linear attention if listed in
``alt_mixer_layers``, else the ``mixer`` (BaseConv), or full attention when there is no ``mixer``.
Sliding windows see ``window_size // 2`` earlier keys plus the query's own; rotary rotates
``2 * ceil(r / 2)`` leading channels with ``r = int(rotary_emb_fraction * head_dim)``; the MLP's
hidden width is ``n_inner`` (default ``int(8 d / 3)``) rounded up to 256.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(value * functional.silu(gate))


class ShortConvolution(nn.Module):
    """Depthwise causal conv over time: y[t] = sum_j w[c, j] x[t - K + 1 + j]."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(
            channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :length].transpose(1, 2)


class BaseConv(nn.Module):
    def __init__(self, d_model: int, expand_proj: int, kernel_size: int) -> None:
        super().__init__()
        self.channels = expand_proj * d_model // 2
        self.in_proj = nn.Linear(d_model, expand_proj * d_model, bias=True)
        self.conv = ShortConvolution(self.channels, kernel_size)
        self.out_proj = nn.Linear(self.channels, d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u1, u2 = torch.split(self.in_proj(x), self.channels, dim=-1)
        return self.out_proj(functional.silu(self.conv(u1)) * u2)


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))]."""
    feature_dim = x.shape[-1]
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (
        math.sqrt(2) * math.sqrt(feature_dim)
    )
    return torch.cat([torch.ones_like(x[..., :1]), x / feature_dim**0.25, second], dim=-1)


class LinearAttention(nn.Module):
    def __init__(self, d_model: int, feature_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.feature_dim, self.eps = num_heads, feature_dim, eps
        self.value_dim = d_model // num_heads
        self.proj_q = nn.Linear(d_model, num_heads * feature_dim, bias=False)
        self.proj_k = nn.Linear(d_model, num_heads * feature_dim, bias=False)
        self.proj_v = nn.Linear(d_model, num_heads * self.value_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * self.value_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.proj_q(x).view(batch, length, self.heads, self.feature_dim).transpose(1, 2)
        k = self.proj_k(x).view(batch, length, self.heads, self.feature_dim).transpose(1, 2)
        v = self.proj_v(x).view(batch, length, self.heads, self.value_dim).transpose(1, 2)
        kernel = taylor_features(q) @ taylor_features(k).transpose(-1, -2)  # [B, H, T, T]
        kernel = kernel * torch.tril(torch.ones(length, length, dtype=x.dtype))
        y = (kernel @ v) / (kernel.sum(-1, keepdim=True) + self.eps)
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, -1))


def rotate(x: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """NeoX-style rotary on ``[B, T, H, D]``: n = ceil(r/2) frequencies, channels [0, 2n)."""
    if rotary_dim == 0:
        return x
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    half = inv_freq.shape[0]
    angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv_freq  # [T, n]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class SoftmaxAttention(nn.Module):
    """Causal softmax attention over the last ``left + 1`` keys (all keys when left is None)."""

    def __init__(
        self, d_model: int, heads: int, left: int | None, rotary_fraction: float, base: float
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.left, self.base = heads, d_model // heads, left, base
        self.rotary_dim = int(rotary_fraction * self.head_dim)
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.Wqkv(x).view(batch, length, 3, self.heads, self.head_dim)
        q = rotate(qkv[:, :, 0], self.rotary_dim, self.base).transpose(1, 2)
        k = rotate(qkv[:, :, 1], self.rotary_dim, self.base).transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]
        allowed = distance >= 0
        if self.left is not None:
            allowed &= distance <= self.left
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1, self.mixer = RMSNorm(d_model, eps), mixer
        self.norm2, self.mlp = RMSNorm(d_model, eps), GatedMLP(d_model, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceLM(nn.Module):
    """``tokens [B, T] -> logits [B, T, V_padded]``; ``lm_head`` tied to the embedding."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        d_model, num_layers = config["n_embd"], config["n_layer"]
        multiple = config.get("pad_vocab_size_multiple", 1)
        vocab = math.ceil(config["vocab_size"] / multiple) * multiple
        eps = config.get("layer_norm_epsilon", 1e-5)
        inner = config.get("n_inner") or int(8 * d_model / 3)
        hidden = (inner + 255) // 256 * 256
        sliding = set(config.get("alt_mixer_2_layers") or [])
        linear = set(config.get("alt_mixer_layers") or [])
        fraction = config.get("rotary_emb_fraction", 0.0)
        base = config.get("rotary_emb_base", 10000.0)
        heads = config["n_head"]

        def mixer_for(index: int) -> nn.Module:
            if index in sliding and "alt_mixer_2" in config:
                left = config["alt_mixer_2"]["window_size"] // 2
                return SoftmaxAttention(d_model, heads, left, fraction, base)
            if index in linear and "alt_mixer" in config:
                alt = config["alt_mixer"]
                return LinearAttention(
                    d_model, alt["feature_dim"], alt["num_heads"], alt.get("eps", 1e-12)
                )
            if "mixer" in config:
                mixer = config["mixer"]
                return BaseConv(d_model, mixer["expand_proj"], mixer.get("kernel_size", 3))
            return SoftmaxAttention(d_model, heads, None, fraction, base)

        self.transformer = nn.Module()
        self.transformer.embeddings = nn.Module()
        self.transformer.embeddings.word_embeddings = nn.Embedding(vocab, d_model)
        self.transformer.layers = nn.ModuleList(
            [Block(mixer_for(i), d_model, hidden, eps) for i in range(num_layers)]
        )
        self.transformer.ln_f = RMSNorm(d_model, eps)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.transformer.embeddings.word_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.transformer.embeddings.word_embeddings(tokens)
        for layer in self.transformer.layers:
            x = layer(x)
        return self.lm_head(self.transformer.ln_f(x))


def randomize(model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Random weights everywhere (norms around 1, so that their mapping matters too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            is_norm = name.endswith(("norm1.weight", "norm2.weight", "ln_f.weight"))
            parameter.copy_(1.0 + noise if is_norm else noise)
