"""A Llama-family transformer (Llama 2 and 3, Mistral, SmolLM) over one contiguous layer range `[start, end)`.

The q/k/v and gate/up projections are stored fused (one matmul each instead of five): on a CPU
the per-op cost dominates a small model's decode step. What the families built on it change is in
`ModelArgs`: biases on q/k/v (Qwen 2), q and k normalised per head (Qwen 3), rotary embeddings over
part of each head (Phi), rescaled rotary frequencies (Llama 3's long-context scaling, linear
scaling, Phi's longrope chosen by the context served), and a sliding attention window (Mistral 7B
v0.1 and Phi 3 name one in their Hugging Face configs; llama.cpp applies none from GGUF files, and
exo reads those as it does).

Norms, rotary embeddings, the cache write and attention go through exo.kernels, as do the matmuls
of layers held quantized (exo.engine.layers).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from exo import kernels
from exo.engine.base import GatedMLP, LayerCache, LayerRange, attend_rotated
from exo.engine.layers import RMSNorm
from exo.shared.errors import ModelFormatError


@dataclass(frozen=True)
class LongRope:
    """Phi 3's long-context rotary scaling ("longrope"): each frequency divided by a factor of its own,
    `short` where the context served is within the original one and `long` beyond it (as llama.cpp picks
    them, by its context size), and the rotated part of q and k scaled by `attention_factor`."""

    short: tuple[float, ...]
    long: tuple[float, ...]
    original_context: int
    attention_factor: float


@dataclass(frozen=True)
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # q, k and v projections add a bias
    qk_norm: bool = False  # q and k RMS-normalised per head before the rotation
    rope_dims: int | None = None  # rotate only the first `rope_dims` of each head (all, if None)
    rope_factors: tuple[float, ...] | None = None  # each rotary frequency divided by its factor
    sliding_window: int | None = None  # each position attends to itself and the `sliding_window - 1` before it
    long_rope: LongRope | None = None  # the factors `for_context` chooses between
    rope_scale: float = 1.0  # what the rotated part of q and k is multiplied by

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        """From a Hugging Face `config.json`."""
        known = inspect.signature(cls).parameters
        if "use_sliding_window" in params:  # Qwen 2 and 3 name a window the layers from max_window_layers on use
            first = params.get("max_window_layers", 28) if params["use_sliding_window"] else params["num_hidden_layers"]
            if 0 < first < params["num_hidden_layers"]:
                raise ModelFormatError("sliding windows on only some layers (use_sliding_window with "
                                       "max_window_layers) are not supported")
            params = params if first == 0 else {**params, "sliding_window": None}
        args = cls(**{k: v for k, v in params.items() if k in known and v is not None})
        rope_dims = int(args.dim_per_head * params.get("partial_rotary_factor", 1.0))
        scaling = params.get("rope_scaling") or {}
        longrope = scaling.get("rope_type", scaling.get("type")) in ("longrope", "su")  # "su": longrope's first name
        return replace(args, rope_dims=rope_dims,
                       rope_factors=None if longrope else rope_factors(scaling, rope_dims, args.rope_theta),
                       long_rope=_long_rope(params, scaling) if longrope else None,
                       tie_word_embeddings=params.get("tie_word_embeddings", False))  # Hugging Face's default

    def for_context(self, context: int | None) -> ModelArgs:
        """These args for an instance that serves `context` positions (None: the model's whole context):
        where they hold longrope factors, the ones that context picks."""
        if self.long_rope is None:
            return self
        served = context or self.max_position_embeddings
        factors = self.long_rope.long if served > self.long_rope.original_context else self.long_rope.short
        return replace(self, rope_factors=factors, rope_scale=self.long_rope.attention_factor)

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


def _long_rope(params: dict[str, Any], scaling: dict[str, Any]) -> LongRope:
    """A Hugging Face config's longrope. Without an `attention_factor` of its own it is
    √(1 + ln s / ln original), s being how far the context was stretched (as transformers computes it)."""
    context = params.get("max_position_embeddings", 4096)
    original = params.get("original_max_position_embeddings", context)
    stretch = context / original if "original_max_position_embeddings" in params else scaling.get("factor", 1.0)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(stretch) / math.log(original)) if stretch > 1 else 1.0
    return LongRope(short=tuple(map(float, scaling["short_factor"])), long=tuple(map(float, scaling["long_factor"])),
                    original_context=original, attention_factor=float(attention))


def rope_factors(scaling: dict[str, Any] | None, dims: int, base: float) -> tuple[float, ...] | None:
    """What a Hugging Face `rope_scaling` divides each of the `dims / 2` rotary frequencies by: the same
    factor for all ("linear"), or Llama 3's: high frequencies kept, low ones divided by the factor, and a
    smooth blend between (by wavelength against the original context length)."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind in ("default", None):
        return None
    if kind == "linear":
        return (factor,) * (dims // 2)
    if kind != "llama3":
        raise ModelFormatError(f"rope scaling {kind!r} is not supported (only linear and llama3)")
    original = scaling["original_max_position_embeddings"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    factors = []
    for i in range(0, dims, 2):
        wavelength = 2 * math.pi * base ** (i / dims)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.n_kv_heads, args.dim_per_head
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                                  bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.rope_traditional, self.rope_base = args.rope_traditional, args.rope_theta
        self.rope_dims = args.rope_dims or self.head_dim
        self.window = args.sliding_window
        self._rope_periods = None if args.rope_factors is None else (
            self.rope_base ** (mx.arange(0, self.rope_dims, 2) / self.rope_dims) * mx.array(args.rope_factors))
        self._rope_scale = None if args.rope_scale == 1.0 else mx.concatenate(  # on the rotated part only
            [mx.full((self.rope_dims,), args.rope_scale), mx.ones((self.head_dim - self.rope_dims,))])

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, -1, self.head_dim)
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=2)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = attend_rotated(q, k, v, cache, self.rotate, scale=self.scale, window=self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def rotate(self, x: mx.array, offset: int | list[int]) -> mx.array:
        x = kernels.rope(x, dims=self.rope_dims, traditional=self.rope_traditional, base=self.rope_base,
                         offset=offset, periods=self._rope_periods)
        return x if self._rope_scale is None else x * self._rope_scale


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, "silu")
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaShard(LayerRange):
    """Layers `[start, end)` of a Llama model, with the embedding and head where the range needs them.
    A family built on it names what it changes in `ModelArgs` (`family`) and whether its GGUF files
    store q/k permuted for interleaved rotation (llama.cpp's converter does so only for Llama)."""

    family: ClassVar[dict[str, Any]] = {}
    gguf_interleaved: ClassVar[bool] = True

    def __init__(self, args: ModelArgs, start: int = 0, end: int | None = None) -> None:
        super().__init__(args, args.num_hidden_layers, start, end)
        if self.is_first or (self.is_last and args.tie_word_embeddings):
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(self.start, self.end)]
        if self.is_last:
            self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
            if not args.tie_word_embeddings:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @classmethod
    def args_from_config(cls, config: dict[str, Any]) -> ModelArgs:
        return replace(ModelArgs.from_dict(config), **cls.family)

    @classmethod
    def args_from_gguf(cls, get: Callable[..., Any], *, vocab_size: int, has_head: bool,
                       rope_factors: tuple[float, ...] | None = None) -> ModelArgs:
        heads, hidden = get("attention.head_count"), get("embedding_length")
        head_dim = get("attention.key_length", hidden // heads)
        if rope_factors is None and get("rope.scaling.type", "none") == "linear":
            rope_factors = (float(get("rope.scaling.factor")),) * (get("rope.dimension_count", head_dim) // 2)
        args = ModelArgs(
            hidden_size=hidden,
            num_hidden_layers=get("block_count"),
            intermediate_size=get("feed_forward_length"),
            num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads),
            head_dim=head_dim,
            vocab_size=vocab_size,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=get("rope.freq_base", 10000.0),
            rope_traditional=cls.gguf_interleaved,
            tie_word_embeddings=not has_head,
            max_position_embeddings=get("context_length", 4096),
            rope_dims=get("rope.dimension_count", head_dim),
            rope_factors=rope_factors,
        )
        return replace(args, **cls.family)

    def embed(self, ids: mx.array) -> mx.array:
        return self.embed_tokens(ids)

    def head(self, h: mx.array) -> mx.array:
        h = self.norm(h)
        return self.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)
