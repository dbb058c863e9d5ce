"""Gemma 3 (text) over one contiguous layer range `[start, end)`.

What sets it apart from Llama: token embeddings scaled by sqrt(hidden size); RMSNorm weights applied
as `1 + w` (GGUF files store them with the 1 added, Hugging Face checkpoints without: `sanitize`
adds it); q and k normalised per head before the rotation; a norm after attention and after the MLP
as well as before each; a GELU-tanh gated MLP; and five sliding-window layers (a 512-position window,
rotary base 10 000) for every global one (rotary base 1 000 000, linear scaling on the larger models).
Queries are scaled by `query_pre_attn_scalar ** -0.5`, and the head is the tied embedding.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from exo import kernels
from exo.engine.base import GatedMLP, LayerCache, LayerRange, attend_rotated
from exo.engine.layers import RMSNorm
from exo.shared.errors import ModelFormatError


@dataclass(frozen=True)
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int = 262_144
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling_factor: float = 1.0  # linear scaling of the global layers' positions
    sliding_window: int = 512
    sliding_window_pattern: int = 6  # every 6th layer is global, the others slide
    query_pre_attn_scalar: float = 256.0
    max_position_embeddings: int = 32_768
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        """From a Hugging Face `config.json` (a multimodal checkpoint's `text_config` too)."""
        params = {**params, **params.get("text_config", {})}
        scaling = params.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type")) == "linear":
            params["rope_scaling_factor"] = float(scaling["factor"])
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in known and v is not None})

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return (layer + 1) % self.sliding_window_pattern != 0


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.n_kv_heads, args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5
        self.qkv_proj = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        sliding = args.is_sliding(layer)
        self.window = args.sliding_window if sliding else None
        self.rope_base = args.rope_local_base_freq if sliding else args.rope_theta
        self.rope_scale = 1.0 if sliding else 1.0 / args.rope_scaling_factor

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, -1, self.head_dim)
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=2)
        q, k = self.q_norm(q).transpose(0, 2, 1, 3), self.k_norm(k).transpose(0, 2, 1, 3)
        out = attend_rotated(q, k, v.transpose(0, 2, 1, 3), cache, self.rotate, scale=self.scale, window=self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def rotate(self, x: mx.array, offset: int | list[int]) -> mx.array:
        return kernels.rope(x, dims=self.head_dim, traditional=False, base=self.rope_base, scale=self.rope_scale,
                            offset=offset)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, "gelu_approx")
        dims, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(dims, eps)
        self.post_attention_layernorm = RMSNorm(dims, eps)
        self.pre_feedforward_layernorm = RMSNorm(dims, eps)
        self.post_feedforward_layernorm = RMSNorm(dims, eps)

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Shard(LayerRange):
    """Layers `[start, end)` of a Gemma 3 text model; the first and last ranges hold the embedding."""

    def __init__(self, args: ModelArgs, start: int = 0, end: int | None = None) -> None:
        super().__init__(args, args.num_hidden_layers, start, end)
        if self.is_first or self.is_last:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(self.start, self.end)]
        if self.is_last:
            self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.embed_scale = math.sqrt(args.hidden_size)

    @classmethod
    def args_from_config(cls, config: dict[str, Any]) -> ModelArgs:
        return ModelArgs.from_dict(config)

    @classmethod
    def args_from_gguf(cls, get: Callable[..., Any], *, vocab_size: int, has_head: bool,
                       rope_factors: tuple[float, ...] | None = None) -> ModelArgs:
        if rope_factors is not None:
            raise ModelFormatError("a Gemma 3 file with per-frequency rotary factors (rope_freqs) is not supported")
        heads, hidden, layers, head_dim = (get("attention.head_count"), get("embedding_length"), get("block_count"),
                                           get("attention.key_length", 256))
        return ModelArgs(
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=get("feed_forward_length"),
            num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads),
            head_dim=head_dim,
            vocab_size=vocab_size,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=get("rope.freq_base", 1_000_000.0),
            rope_scaling_factor=get("rope.scaling.factor", 1.0),
            sliding_window=get("attention.sliding_window", 512),
            # as llama.cpp: the head size, but for the 27B model (62 layers), whose is hidden / heads
            query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
            max_position_embeddings=get("context_length", 32_768),
        )

    def embed(self, ids: mx.array) -> mx.array:
        return self.embed_tokens(ids) * self.embed_scale

    def head(self, h: mx.array) -> mx.array:
        return self.embed_tokens.as_linear(self.norm(h))

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """A Hugging Face checkpoint's weights as this model holds them: norms with their 1 added."""
        return {name: value + 1 if name.endswith("norm.weight") else value for name, value in weights.items()}
