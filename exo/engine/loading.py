"""Load a model's layer range from a GGUF file or an MLX/Hugging Face style directory.

Both formats are first brought to one naming scheme (Hugging Face's, without the `model.`
prefix), then narrowed to the layer range, fused, and converted to the engine's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx

from exo.engine.base import LayerRange
from exo.engine.converted import ConvertedCache
from exo.engine.gemma3 import Gemma3Shard
from exo.engine.gguf import GROUP_SIZE as GGUF_GROUP_SIZE
from exo.engine.gguf import GGUFFile
from exo.engine.layers import quantize
from exo.engine.llama import LlamaShard, LongRope
from exo.engine.llama import ModelArgs as LlamaArgs
from exo.engine.phi3 import Phi3Shard
from exo.engine.qwen2 import Qwen2Shard
from exo.engine.qwen3 import Qwen3Shard
from exo.engine.tokenizer import Tokenizer
from exo.shared.errors import ModelFormatError
from exo.shared.types import CacheDtype, Dtype

log = logging.getLogger(__name__)


_FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# GGUF's tensor names → the engine's (Hugging Face's, without the `model.` prefix); first match wins.
_GGUF_COMMON = [
    (r"^token_embd\.", "embed_tokens."),
    (r"^output_norm\.", "norm."),
    (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.attn_norm\.", r"layers.\1.input_layernorm."),
    (r"^blk\.(\d+)\.attn_q\.", r"layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.ffn_gate\.", r"layers.\1.mlp.gate_proj."),
    (r"^blk\.(\d+)\.ffn_up\.", r"layers.\1.mlp.up_proj."),
    (r"^blk\.(\d+)\.ffn_down\.", r"layers.\1.mlp.down_proj."),
]
_GGUF_LLAMA = [*_GGUF_COMMON, (r"^blk\.(\d+)\.ffn_norm\.", r"layers.\1.post_attention_layernorm.")]
_GGUF_QK_NORMS = [
    (r"^blk\.(\d+)\.attn_q_norm\.", r"layers.\1.self_attn.q_norm."),
    (r"^blk\.(\d+)\.attn_k_norm\.", r"layers.\1.self_attn.k_norm."),
]
_GGUF_ARCHITECTURES: dict[str, tuple[type[LayerRange], list[tuple[str, str]]]] = {
    "llama": (LlamaShard, _GGUF_LLAMA),
    "qwen2": (Qwen2Shard, _GGUF_LLAMA),
    "qwen3": (Qwen3Shard, [*_GGUF_QK_NORMS, *_GGUF_LLAMA]),
    "phi3": (Phi3Shard, [  # q/k/v and gate/up stored fused, as the engine holds them
        (r"^blk\.(\d+)\.attn_qkv\.", r"layers.\1.self_attn.qkv_proj."),
        (r"^blk\.(\d+)\.ffn_up\.", r"layers.\1.mlp.gate_up_proj."),
        *_GGUF_LLAMA,
    ]),
    "gemma3": (Gemma3Shard, [
        *_GGUF_COMMON,
        *_GGUF_QK_NORMS,
        (r"^blk\.(\d+)\.post_attention_norm\.", r"layers.\1.post_attention_layernorm."),
        (r"^blk\.(\d+)\.ffn_norm\.", r"layers.\1.pre_feedforward_layernorm."),
        (r"^blk\.(\d+)\.post_ffw_norm\.", r"layers.\1.post_feedforward_layernorm."),
    ]),
}
_DIRECTORY_ARCHITECTURES: dict[str, type[LayerRange]] = {
    "llama": LlamaShard, "mistral": LlamaShard, "qwen2": Qwen2Shard, "qwen3": Qwen3Shard, "phi3": Phi3Shard,
    "gemma3": Gemma3Shard, "gemma3_text": Gemma3Shard,
}
# What a model directory's loader reads: its weights, config, tokenizer and template (not other formats'
# weights, such as PyTorch's *.bin beside the safetensors).
_DIRECTORY_FILES = (".safetensors", ".json", ".jinja")
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_PARTS = ("weight", "scales", "biases")  # a weight as stored: float, or MLX's affine codes and their groups


@dataclass
class LoadedModel:
    model: LayerRange
    tokenizer: Tokenizer
    args: Any  # the architecture's ModelArgs


def load(path: Path, start: int = 0, end: int | None = None, dtype: Dtype = "quantized",
         kv_cache: CacheDtype | None = None, context: int | None = None) -> LoadedModel:
    """Load layers `[start, end)` of the model at `path` (a `.gguf` file or a model directory).
    "quantized" keeps every quantized tensor as stored (GGUF types as exo.engine.gguf converts them, an
    MLX directory's as they are) and float tensors as they are; a float dtype dequantizes all. Only the
    range's tensors are read. `kv_cache` is the dtype of the caches `make_cache` gives (None: the
    activations'). `context` is the positions the model will serve (None: its whole context), which
    picks longrope's factors. Raises ModelFormatError, saying what and why, for files that are
    unsupported, damaged or not a model."""
    with _reading(path):
        source = _open(path)
        tokenizer = source.tokenizer
    args = source.args.for_context(context) if isinstance(source.args, LlamaArgs) else source.args
    model = source.architecture(args, start, end)  # a range outside the model is the caller's bug
    model.cache_dtype = _FLOAT_DTYPES[kv_cache] if kv_cache else None
    with _reading(path):
        def convert() -> dict[str, mx.array]:
            return _fuse(source.read(lambda name: _in_range(name, model)), source.group_size)

        weights = source.converted.weights(model.start, model.end, convert) if source.converted else convert()
        if dtype == "quantized":
            prefixes = [name.removesuffix(".scales") for name in weights if name.endswith(".scales")]
            quantize(model, {p: (source.group_size, _prefix_bits(weights, p, source.group_size)) for p in prefixes})
        else:
            weights = _dequantize(weights, source.group_size, _FLOAT_DTYPES[dtype])
        model.load_weights(list(weights.items()), strict=True)
        mx.eval(model.parameters())
    log.info("loaded %s layers [%d, %d) of %d as %s", path.name, model.start, model.end,
             model.n_layers, dtype)
    return LoadedModel(model, tokenizer, args)


def load_tokenizer(path: Path) -> tuple[Tokenizer, Any]:
    """The tokenizer and shape of the model at `path`, for a process that renders prompts but holds no layers."""
    with _reading(path):
        source = _open(path, tensors=False)
        return source.tokenizer, source.args


@dataclass(frozen=True)
class Extent:
    """The bytes of one of a model's files that loading a layer range reads."""

    name: str  # the file's name (in the model's directory, for a directory)
    size: int  # the whole file's
    spans: tuple[tuple[int, int], ...]  # (offset, length), in order, not overlapping


def extents(path: Path, layers: tuple[int, int] | None) -> list[Extent]:
    """What loading layers `[start, end)` of the model at `path` reads, file by file; with `layers` None,
    what its tokenizer and shape alone need (the header, the small files). A node that lacks the model
    fetches just these bytes from one that has it (exo/models/peers.py)."""
    with _reading(path):
        source = _open(path, tensors=False)
        wants = None if layers is None else _Wants.of(source.args, *layers)

        def wanted(engine_name: str) -> bool:
            return wants is not None and _in_range(engine_name, wants) is not None

        if path.is_file():
            file = GGUFFile(path)
            names = _GGUF_ARCHITECTURES[file.architecture][1]
            header = min((t.offset for t in file.tensors.values()), default=path.stat().st_size)
            spans = [(0, header)] + sorted(
                (t.offset, t.nbytes) for name, t in file.tensors.items()
                if name == "rope_freqs.weight" or ((engine := _rename(name, names)) is not None and wanted(engine)))
            return [Extent(path.name, path.stat().st_size, _merged(spans))]
        out = []
        for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _DIRECTORY_FILES):
            size = file.stat().st_size
            if file.suffix != ".safetensors":
                out.append(Extent(file.name, size, ((0, size),) if size else ()))
                continue
            with file.open("rb") as f:
                header_bytes = 8 + int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_bytes - 8))
            spans = [(0, header_bytes)] + sorted(
                (header_bytes + begin, end - begin) for name, info in header.items() if name != "__metadata__"
                for begin, end in [info["data_offsets"]]
                if wanted(name.removeprefix("language_model.").removeprefix("model.")))
            out.append(Extent(file.name, size, _merged(spans)))
        return out


class Footprint(NamedTuple):
    """What a model takes: to hold its weights, and for each position of context it serves."""

    stored: int  # bytes of weights, as stored
    params: int
    n_layers: int
    kv_width: int  # keys and values one position adds to one layer's cache: 2 x kv heads x head size
    context_length: int  # the most positions it was trained for


def footprint(path: Path) -> Footprint:
    """The model at `path`. A quantized directory's parameters are counted from its groups (each scale
    stands for `group_size` weights)."""
    with _reading(path):
        source = _open(path, tensors=False)
        args = source.args

        def described(stored: int, params: int) -> Footprint:
            return Footprint(stored, params, args.num_hidden_layers, 2 * args.n_kv_heads * args.dim_per_head,
                             args.max_position_embeddings)

        if path.is_file():
            tensors = GGUFFile(path).tensors.values()
            return described(sum(t.nbytes for t in tensors), sum(math.prod(t.shape) for t in tensors))
        stored = params = 0
        for file in sorted(path.glob("*.safetensors")):
            stored += file.stat().st_size
            with file.open("rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            header.pop("__metadata__", None)
            for name, info in header.items():
                prefix, _, part = name.rpartition(".")
                if part in ("scales", "biases") and f"{prefix}.weight" in header:
                    params += math.prod(info["shape"]) * source.group_size if part == "scales" else 0
                elif not (part == "weight" and f"{prefix}.scales" in header):
                    params += math.prod(info["shape"])
        return described(stored, params)


def _merged(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted (offset, length) spans with touching or overlapping ones joined, empty ones dropped."""
    out: list[tuple[int, int]] = []
    for offset, length in spans:
        if length <= 0:
            continue
        if out and offset <= out[-1][0] + out[-1][1]:
            last_offset, last_length = out[-1]
            out[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            out.append((offset, length))
    return tuple(out)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what reading a damaged or foreign model raises, from the reader, the tokenizer or a config,
    into one ModelFormatError naming the file and why."""
    try:
        yield
    except ModelFormatError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as e:
        said = str(e).strip("'\"") or type(e).__name__
        why = f"it is missing {said!r}" if isinstance(e, KeyError) else f"it cannot be read: {said}"
        raise ModelFormatError(f"{path.name} is not a model exo can serve: {why}") from e


def _checked(args: Any, path: Path) -> Any:
    """`args`, if they describe a model at all."""
    sizes = (args.hidden_size, args.num_hidden_layers, args.intermediate_size, args.num_attention_heads,
             args.vocab_size)
    if not all(isinstance(n, int) and n > 0 for n in sizes):
        raise ModelFormatError(f"{path.name}: its shape is incomplete (hidden size, layers, MLP size, heads, "
                               f"vocabulary: {sizes})")
    return args


Wanted = Callable[[str], str | None]  # a tensor's engine name → its name in the range's model, or None


@dataclass
class _Source:
    """An opened model: what it is, and how to read the tensors a layer range wants."""

    architecture: type[LayerRange]
    args: Any
    make_tokenizer: Callable[[], Tokenizer]  # built when asked for: a large vocabulary takes most of a second
    group_size: int
    read: Callable[[Wanted], dict[str, mx.array]]
    converted: ConvertedCache | None = None  # where a file's converted ranges are kept

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return self.make_tokenizer()


def _open(path: Path, *, tensors: bool = True) -> _Source:
    if path.is_file() and path.suffix == ".gguf":
        return _open_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _open_directory(path, tensors=tensors)
    raise ModelFormatError(f"{path} is neither a .gguf file nor a directory with config.json")


def _open_gguf(path: Path) -> _Source:
    file = GGUFFile(path)
    arch = file.architecture
    if arch not in _GGUF_ARCHITECTURES:
        raise ModelFormatError(f"{path.name}: architecture {arch!r} is not supported "
                               f"(only {', '.join(map(repr, _GGUF_ARCHITECTURES))})")
    model, names = _GGUF_ARCHITECTURES[arch]
    meta = file.metadata

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFormatError(f"{path.name}: its metadata lacks {arch}.{key}")
        return value

    vocab = get("vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))
    factors = None
    if "rope_freqs.weight" in file.tensors:  # Llama 3's rescaled frequencies
        factors = tuple(file.floats("rope_freqs.weight").tolist())  # numpy: no MLX where only the shape is asked
    args = _checked(model.args_from_gguf(get, vocab_size=vocab, has_head="output.weight" in file.tensors,
                                         rope_factors=factors), path)
    if long_context := sorted(name for name in file.tensors if name.startswith("rope_factors_")):
        if not isinstance(args, LlamaArgs) or long_context != ["rope_factors_long.weight", "rope_factors_short.weight"]:
            raise ModelFormatError(f"{path.name}: its long-context rotary factors ({', '.join(long_context)}) are "
                                   f"not supported for {arch}")
        args = replace(args, long_rope=LongRope(  # read as llama.cpp reads them
            short=tuple(file.floats("rope_factors_short.weight").tolist()),
            long=tuple(file.floats("rope_factors_long.weight").tolist()),
            original_context=get("rope.scaling.original_context_length", args.max_position_embeddings),
            attention_factor=float(get("rope.scaling.attn_factor", 1.0))))
    engine_names = {name: engine for name in file.tensors if (engine := _rename(name, names)) is not None}

    def read(wanted: Wanted) -> dict[str, mx.array]:
        targets = {name: target for name, engine in engine_names.items() if (target := wanted(engine)) is not None}
        progress = _Progress(path.name, sum(file.tensors[name].nbytes for name in targets))
        weights = {}
        for name, target in targets.items():
            parts = file.tensor(name)  # one tensor converted at a time
            progress.advance(file.tensors[name].nbytes)
            if target.endswith(".weight"):
                weights.update({f"{target.removesuffix('.weight')}.{part}": value for part, value in parts.items()})
            else:  # a bias or a norm's weight: always float
                weights[target] = parts["weight"]
        return weights

    return _Source(model, args, lambda: Tokenizer.from_gguf_metadata(meta), GGUF_GROUP_SIZE, read,
                   ConvertedCache(path))


class _Progress:
    """Logs how far a conversion has come, every few seconds while it lasts."""

    EVERY_S = 5.0

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done = name, total, 0
        self.start = self.last = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self.last >= self.EVERY_S:
            self.last = now
            log.info("converting %s: %d%% of %d MB, %.0f s", self.name, 100 * self.done // max(self.total, 1),
                     self.total // 1_000_000, now - self.start)


def _rename(name: str, names: list[tuple[str, str]]) -> str | None:
    for pattern, repl in names:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def _open_directory(path: Path, *, tensors: bool) -> _Source:
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type", "llama")
    if model_type not in _DIRECTORY_ARCHITECTURES:
        raise ModelFormatError(f"{path.name}: model_type {model_type!r} is not supported "
                               f"(only {', '.join(map(repr, _DIRECTORY_ARCHITECTURES))})")
    model = _DIRECTORY_ARCHITECTURES[model_type]
    files = sorted(path.glob("*.safetensors"))
    if tensors and not files:
        raise ModelFormatError(f"{path} holds no *.safetensors files")

    def read(wanted: Wanted) -> dict[str, mx.array]:
        weights: dict[str, mx.array] = {}
        for file in files:
            for name, value in mx.load(str(file)).items():
                name = name.removeprefix("language_model.").removeprefix("model.")
                if "rotary_emb.inv_freq" in name:  # older checkpoints save what the engine computes
                    continue
                if (target := wanted(name)) is not None:
                    weights[target] = value
        return model.sanitize(weights)

    group_size = config.get("quantization", {}).get("group_size", 64)
    try:
        args = model.args_from_config(config)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path.name}: {e}") from e
    return _Source(model, _checked(args, path), lambda: Tokenizer.from_directory(path), group_size, read)


@dataclass(frozen=True)
class _Wants:
    """What a range's model holds, told without building it (no MLX arrays: the node's own process asks,
    and MLX threads started there abort it at exit)."""

    start: int
    end: int
    is_last: bool
    embeds: bool

    @classmethod
    def of(cls, args: Any, start: int, end: int) -> _Wants:
        is_last = end == args.num_hidden_layers
        return cls(start, end, is_last, start == 0 or (is_last and getattr(args, "tie_word_embeddings", False)))

    def __contains__(self, name: str) -> bool:
        return name == "embed_tokens" and self.embeds


def _in_range(name: str, model: LayerRange | _Wants) -> str | None:
    """`name` as `model`'s range holds it (layers renumbered from 0), or None if the range has no use for it."""
    if match := re.match(r"layers\.(\d+)\.(.*)", name):
        index = int(match.group(1))
        return f"layers.{index - model.start}.{match.group(2)}" if model.start <= index < model.end else None
    if name.startswith("embed_tokens.") and "embed_tokens" in model:
        return name
    if name.startswith(("norm.", "lm_head.")) and model.is_last:
        return name
    return None


def _fuse(weights: dict[str, mx.array], group_size: int) -> dict[str, mx.array]:
    """Concatenate q/k/v and gate/up along their output rows (quantized or not, rows stay whole), and their
    biases where they have them. Parts stored differently (a Q4_K_M file's 4-bit q beside its 8-bit v) are
    first widened to the widest."""
    n_layers = len({k.split(".")[1] for k in weights if k.startswith("layers.")})
    for i in range(n_layers):
        for fused, parts in _FUSED.items():
            prefixes = [f"layers.{i}.{part}" for part in parts]
            if not all(f"{p}.weight" in weights for p in prefixes):
                continue
            tensors = _alike([{s: weights.pop(f"{p}.{s}") for s in _PARTS if f"{p}.{s}" in weights}
                              for p in prefixes], group_size)
            for suffix in tensors[0]:
                weights[f"layers.{i}.{fused}.{suffix}"] = mx.concatenate([t[suffix] for t in tensors])
            if all(f"{p}.bias" in weights for p in prefixes):  # Qwen 2's q/k/v
                weights[f"layers.{i}.{fused}.bias"] = mx.concatenate(
                    [weights.pop(f"{p}.bias").astype(mx.float32) for p in prefixes])
    return weights


def _alike(tensors: list[dict[str, mx.array]], group_size: int) -> list[dict[str, mx.array]]:
    """`tensors` (weight, and scales and biases if quantized) stored alike, losing nothing: float ones
    quantized only if another is, 4-bit codes widened to 8, fp16 scales to float32."""
    quantized = [t for t in tensors if "scales" in t]
    if not quantized:
        dtype = max((t["weight"].dtype for t in tensors), key=lambda d: d.size)
        return [{"weight": t["weight"].astype(dtype)} for t in tensors]
    bits = {_bits(t, group_size) for t in quantized}
    scale_types = {t["scales"].dtype for t in quantized}
    if len(quantized) == len(tensors) and len(bits) == 1 and len(scale_types) == 1:
        return tensors
    out = []
    for t in tensors:
        if "scales" not in t:  # as 8 bits in the quantized parts' groups: the nearest affine grid
            w, scales, biases = mx.quantize(t["weight"].astype(mx.float32), group_size=group_size, bits=8)
            t = {"weight": w, "scales": scales, "biases": biases}
        elif _bits(t, group_size) == 4:
            packed = t["weight"].view(mx.uint8)
            codes = mx.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
            t = {**t, "weight": codes.view(mx.uint32)}
        out.append({"weight": t["weight"], "scales": t["scales"].astype(mx.float32),
                    "biases": t["biases"].astype(mx.float32)})
    return out


def _bits(tensor: dict[str, mx.array], group_size: int) -> int:
    return tensor["weight"].shape[-1] * 32 // (tensor["scales"].shape[-1] * group_size)


def _prefix_bits(weights: dict[str, mx.array], prefix: str, group_size: int) -> int:
    return _bits({"weight": weights[f"{prefix}.weight"], "scales": weights[f"{prefix}.scales"]}, group_size)


def _dequantize(weights: dict[str, mx.array], group_size: int, dtype: mx.Dtype) -> dict[str, mx.array]:
    out = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in weights:
            continue
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{prefix}.scales" in weights:
            bits = _prefix_bits(weights, prefix, group_size)
            value = mx.dequantize(value, weights[f"{prefix}.scales"], weights[f"{prefix}.biases"],
                                  group_size=group_size, bits=bits)
        out[name] = value.astype(dtype)
    return out
