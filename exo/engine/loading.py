"""Load a model's layer range from a GGUF file or an MLX/Hugging Face style directory.

Both formats are first brought to one naming scheme (Hugging Face's, without the `model.`
prefix), then narrowed to the layer range, fused, and converted to the engine's dtype.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from exo.engine.layers import quantize
from exo.engine.llama import LlamaShard, ModelArgs
from exo.engine.tokenizer import Tokenizer
from exo.shared.errors import ModelFormatError
from exo.shared.types import Dtype

log = logging.getLogger(__name__)


_FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_GGUF_GROUP_SIZE = 32

_GGUF_NAMES = [
    (r"^token_embd\.", "embed_tokens."),
    (r"^output_norm\.", "norm."),
    (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.attn_norm\.", r"layers.\1.input_layernorm."),
    (r"^blk\.(\d+)\.ffn_norm\.", r"layers.\1.post_attention_layernorm."),
    (r"^blk\.(\d+)\.attn_q\.", r"layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.ffn_gate\.", r"layers.\1.mlp.gate_proj."),
    (r"^blk\.(\d+)\.ffn_up\.", r"layers.\1.mlp.up_proj."),
    (r"^blk\.(\d+)\.ffn_down\.", r"layers.\1.mlp.down_proj."),
]
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_PARTS = ("weight", "scales", "biases")


@dataclass
class LoadedModel:
    model: LlamaShard
    tokenizer: Tokenizer
    args: ModelArgs


def load(path: Path, start: int = 0, end: int | None = None, dtype: Dtype = "quantized") -> LoadedModel:
    """Load layers `[start, end)` of the model at `path` (a `.gguf` file or a model directory).
    "quantized" keeps every quantized tensor as stored (GGUF Q4_0/Q4_1/Q8_0 arrive from MLX's reader as
    its affine format with groups of 32) and float tensors as they are; a float dtype dequantizes all.
    Raises ModelFormatError, saying what and why, for files that are unsupported, damaged or not a model."""
    with _reading(path):
        if path.is_file() and path.suffix == ".gguf":
            weights, args, group_size, tokenizer = _read_gguf(path)
        elif path.is_dir() and (path / "config.json").is_file():
            weights, args, group_size, tokenizer = _read_directory(path)
        else:
            raise ModelFormatError(f"{path} is neither a .gguf file nor a directory with config.json")
    model = LlamaShard(args, start, end)  # a range outside the model is the caller's bug: ValueError
    with _reading(path):
        weights = _fuse(_select_range(weights, model))
        if dtype == "quantized":
            prefixes = [name.removesuffix(".scales") for name in weights if name.endswith(".scales")]
            quantize(model, {prefix: (group_size, _bits(weights, prefix, group_size)) for prefix in prefixes})
        else:
            weights = _dequantize(weights, group_size, _FLOAT_DTYPES[dtype])
        model.load_weights(list(weights.items()), strict=True)
        mx.eval(model.parameters())
    log.info("loaded %s layers [%d, %d) of %d as %s", path.name, model.start, model.end,
             args.num_hidden_layers, dtype)
    return LoadedModel(model, tokenizer, args)


def load_tokenizer(path: Path) -> tuple[Tokenizer, ModelArgs]:
    """The tokenizer and shape of the model at `path`, for a process that renders prompts but holds no layers."""
    with _reading(path):
        if path.is_file() and path.suffix == ".gguf":
            _, args, _, tokenizer = _read_gguf(path)  # reads the tensors too; MLX has no metadata-only read
            return tokenizer, args
        if path.is_dir() and (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            return Tokenizer.from_directory(path), _checked(ModelArgs.from_dict(config), path)
    raise ModelFormatError(f"{path} is neither a .gguf file nor a directory with config.json")


# What MLX's loader says, and what it means for the person who chose the file.
_MLX_SAYS = [
    ("gguf_tensor_to_f16 failed", "it holds tensors of a quantization MLX cannot read (K-quants such as Q3_K, Q5_K "
                                  "or Q8_K, as in Q4_K_M files); use a Q4_0, Q4_1, Q8_0 or F16 GGUF"),
    ("gguf_init failed", "it is not a GGUF file (its header cannot be read), or it is cut short"),
    ("extends past the end of the file", "it is cut short (an incomplete download or a damaged copy)"),
]


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what reading a damaged or foreign model raises, from MLX, the tokenizer or a config, into
    one ModelFormatError naming the file and why."""
    try:
        yield
    except ModelFormatError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as e:
        said = str(e).strip("'\"") or type(e).__name__
        why = next((meaning for clue, meaning in _MLX_SAYS if clue in said), None)
        if why is None:
            why = f"it is missing {said!r}" if isinstance(e, KeyError) else f"it cannot be read: {said}"
        raise ModelFormatError(f"{path.name} is not a model exo can serve: {why}") from e


def _checked(args: ModelArgs, path: Path) -> ModelArgs:
    """`args`, if they describe a model at all."""
    sizes = (args.hidden_size, args.num_hidden_layers, args.intermediate_size, args.num_attention_heads,
             args.vocab_size)
    if not all(isinstance(n, int) and n > 0 for n in sizes):
        raise ModelFormatError(f"{path.name}: its shape is incomplete (hidden size, layers, MLP size, heads, "
                               f"vocabulary: {sizes})")
    return args


def _read_gguf(path: Path) -> tuple[dict[str, mx.array], ModelArgs, int, Tokenizer]:
    raw, meta = mx.load(str(path), return_metadata=True)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"{path.name}: architecture {arch!r} is not supported (only 'llama')")

    def num(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}")
        if value is None and default is None:
            raise ModelFormatError(f"{path.name}: its metadata lacks llama.{key}")
        return default if value is None else value.item()

    head_count = num("attention.head_count")
    hidden = num("embedding_length")
    args = ModelArgs(
        hidden_size=hidden,
        num_hidden_layers=num("block_count"),
        intermediate_size=num("feed_forward_length"),
        num_attention_heads=head_count,
        num_key_value_heads=num("attention.head_count_kv", head_count),
        head_dim=num("attention.key_length", hidden // head_count),
        vocab_size=num("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        rms_norm_eps=num("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=num("rope.freq_base", 10000.0),
        rope_traditional=True,  # GGUF stores q/k permuted for interleaved rotary embeddings
        tie_word_embeddings="output.weight" not in raw,
        max_position_embeddings=num("context_length", 4096),
    )
    _checked(args, path)
    weights = {}
    for name, value in raw.items():
        for pattern, repl in _GGUF_NAMES:
            if re.match(pattern, name):
                weights[re.sub(pattern, repl, name)] = value
                break
    return weights, args, _GGUF_GROUP_SIZE, Tokenizer.from_gguf_metadata(meta)


def _read_directory(path: Path) -> tuple[dict[str, mx.array], ModelArgs, int, Tokenizer]:
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type", "llama") not in ("llama", "mistral"):
        raise ModelFormatError(f"{path.name}: model_type {config['model_type']!r} is not supported")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path} holds no *.safetensors files")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(mx.load(str(file)))
    weights = {k.removeprefix("model."): v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    group_size = config.get("quantization", {}).get("group_size", 64)
    return weights, _checked(ModelArgs.from_dict(config), path), group_size, Tokenizer.from_directory(path)


def _select_range(weights: dict[str, mx.array], model: LlamaShard) -> dict[str, mx.array]:
    """Keep the tensors of `model`'s range, with its layers renumbered from 0."""
    kept = {}
    for name, value in weights.items():
        if match := re.match(r"layers\.(\d+)\.(.*)", name):
            index = int(match.group(1))
            if model.start <= index < model.end:
                kept[f"layers.{index - model.start}.{match.group(2)}"] = value
        elif name.startswith("embed_tokens.") and hasattr(model, "embed_tokens"):
            kept[name] = value
        elif name.startswith(("norm.", "lm_head.")) and model.is_last:
            kept[name] = value
    return kept


def _fuse(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Concatenate q/k/v and gate/up along their output rows (quantized or not, rows stay whole)."""
    n_layers = len({k.split(".")[1] for k in weights if k.startswith("layers.")})
    for i in range(n_layers):
        for fused, parts in _FUSED.items():
            for suffix in _PARTS:
                names = [f"layers.{i}.{part}.{suffix}" for part in parts]
                if all(name in weights for name in names):
                    weights[f"layers.{i}.{fused}.{suffix}"] = mx.concatenate([weights.pop(n) for n in names])
    return weights


def _bits(weights: dict[str, mx.array], prefix: str, group_size: int) -> int:
    packed, scales = weights[f"{prefix}.weight"], weights[f"{prefix}.scales"]
    return packed.shape[-1] * 32 // (scales.shape[-1] * group_size)


def _dequantize(weights: dict[str, mx.array], group_size: int, dtype: mx.Dtype) -> dict[str, mx.array]:
    out = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in weights:
            continue
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{prefix}.scales" in weights:
            bits = _bits(weights, prefix, group_size)
            value = mx.dequantize(value, weights[f"{prefix}.scales"], weights[f"{prefix}.biases"],
                                  group_size=group_size, bits=bits)
        out[name] = value.astype(dtype)
    return out
