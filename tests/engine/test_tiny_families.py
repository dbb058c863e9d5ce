"""Tiny random-weight models of each family (Llama, with and without Llama 3's rotary factors, Qwen 2,
Qwen 3, Phi 3, Gemma 3), written by the test with the gguf package's writer (the real models'
vocabularies, every tensor of a different GGUF type as Q4_K_M files mix them), read by
exo and by llama.cpp: the logits at every position within a stated tolerance of llama.cpp's, and the
same top token at every position but where the two engines' own noise can reorder a near-tie."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from mlx.utils import tree_flatten

from exo.engine.base import LayerRange
from exo.engine.gguf import GGUFFile
from exo.engine.llama import ModelArgs
from exo.engine.loading import load, load_tokenizer
from exo.models.peers import ModelServer
from exo.shared.errors import ModelFormatError

pytest.importorskip("llama_cpp")
from exo.llama_cpp_engine import open_llama_cpp  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 256, 4, 2, 64, 512  # rows of 256: whole K-quant super-blocks
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."
# llama.cpp multiplies with its activations quantized to 8 bits; exo keeps them float32. As fractions of
# the logits' spread (their standard deviation over the vocabulary) at each position; measured: means
# 0.006-0.010 and largest 0.036-0.076 (the 2-layer families), mean 0.018 and largest 0.175 (gemma3,
# 6 layers), the same at every position (so nothing but that noise: a window or mask error would grow
# past the window). Leaving out what sets a family apart fails them: Llama 3's rotary factors (mean
# 0.056, largest 0.63), Phi's partial rotation (0.081, 0.76), Qwen 3's q/k norms (0.046, 0.38), Qwen 2's
# biases (0.88, 5.3).
MEAN_TOLERANCE, MAX_TOLERANCE = 0.03, 0.2

# Per type: where its blocks hold fp16 scales, and the scale that keeps random codes' weights near ±0.05.
SCALES: dict[T, tuple[tuple[int, float], ...]] = {
    T.Q8_0: ((0, 3e-4),), T.Q4_0: ((0, 5e-3),), T.Q4_1: ((0, 5e-3), (2, -0.035)), T.Q5_0: ((0, 3e-3),),
    T.Q5_1: ((0, 3e-3), (2, -0.045)), T.Q4_K: ((0, 5e-5), (2, 4e-4)), T.Q6_K: ((208, 1e-5),),
}


def random_tensor(kind: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random codes in `kind`'s blocks, with its scales set to keep the weights small."""
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at, scale in SCALES[kind]:
        raw[:, at : at + 2] = np.full((len(raw), 1), scale, np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


# The attention input's norm scales q and k up, so attention is sharp (as a trained model's): soft attention
# over random weights hardly depends on where the keys are, and so would not catch a wrong rotation.
ATTENTION_GAIN = 3.0
# Each layer's projections as llama.cpp names them, `[rows, cols]`; Phi 3 stores q/k/v and gate/up fused.
SHAPES = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
          "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
          "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
FUSED_SHAPES = {"attn_qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
                "ffn_up": (2 * FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
# q and k 4-bit beside an 8-bit v (a Q4_K_M file's mix), gate and up of different 8-bit types.
TYPES = {"attn_q": T.Q4_K, "attn_k": T.Q4_0, "attn_v": T.Q6_K, "attn_output": T.F16,
         "ffn_gate": T.Q5_0, "ffn_up": T.Q5_1, "ffn_down": T.Q4_1}
FUSED_TYPES = {"attn_qkv": T.Q4_K, "attn_output": T.Q5_0, "ffn_up": T.Q4_0, "ffn_down": T.Q6_K}
LLAMA_NORMS = ["attn_norm", "ffn_norm"]


# Llama 3.1's scaling, its original context shortened so that the prompt's positions span kept, slowed
# and blended frequencies.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def llama3_factors(scaling: dict[str, Any], dims: int, base: float) -> np.ndarray:
    """What each rotary frequency is divided by, from the rescaled inverse frequencies as Meta defines them:
    those of wavelength under original / high kept, over original / low divided by the factor, a blend
    between."""
    inverse = base ** -(np.arange(0, dims, 2) / dims)
    wavelength = 2 * np.pi / inverse
    original, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = np.clip((original / wavelength - low) / (high - low), 0, 1)
    scaled = (1 - smooth) * inverse / factor + smooth * inverse
    return (inverse / scaled).astype(np.float32)


@dataclass(frozen=True)
class Family:
    """How to write a tiny model of one architecture."""

    architecture: str
    vocabulary: str  # the real model whose vocabulary it takes: "smollm" or "gemma"
    n_layers: int = 2
    norms: list[str] = field(default_factory=lambda: LLAMA_NORMS)
    shapes: dict[str, tuple[int, int]] = field(default_factory=lambda: SHAPES)
    types: dict[str, T] = field(default_factory=lambda: TYPES)
    biases: tuple[str, ...] = ()  # projections with a bias
    head: bool = False  # an output matrix of its own (else the head is the tied embedding)
    rope_factors: bool = False  # a `rope_freqs` tensor: Llama 3's rescaled rotary frequencies
    long_rope: bool = False  # `rope_factors_short`/`_long` tensors: Phi's longrope, LONG_ROPE's factors
    context_length: int = 512
    metadata: Callable[[GGUFWriter], None] = lambda writer: writer.add_rope_freq_base(10000.0)
    config: dict[str, Any] = field(default_factory=dict)  # the same model's Hugging Face config.json
    permuted: bool = False  # q and k rows stored permuted for interleaved rotation (llama.cpp's llama)


def gemma3_metadata(writer: GGUFWriter) -> None:
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(8)  # shorter than the prompt: the local layers' window is exercised


def phi3_metadata(writer: GGUFWriter) -> None:
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HEAD_DIM // 2)  # rotary over half of each head, as Phi 4 mini's


# Phi 3.5 and Phi 4 mini's rotary scaling, as their configs and llama.cpp's converter write it: a context
# stretched 256 times from an original 256, so the attention factor is √(1 + ln 256 / ln 256) = √2 (as
# the converter computes it: large enough that leaving it out fails the comparison), and factors for
# each of the 16 rotated frequency pairs.
LONG_ROPE = {"rope_type": "longrope", "short_factor": [1 + 0.05 * i for i in range(HEAD_DIM // 4)],
             "long_factor": [1 + 0.5 * i for i in range(HEAD_DIM // 4)]}
LONG_ROPE_ORIGINAL, LONG_ROPE_CONTEXT = 256, 256 * 256


def phi3_long_rope_metadata(writer: GGUFWriter) -> None:
    phi3_metadata(writer)
    writer.add_rope_scaling_orig_ctx_len(LONG_ROPE_ORIGINAL)
    writer.add_rope_scaling_attn_factors(math.sqrt(2))


FAMILIES = {
    "llama": Family("llama", "smollm", permuted=True, config={"model_type": "llama"}),
    "llama3": Family("llama", "smollm", head=True, rope_factors=True, permuted=True,
                     config={"model_type": "llama", "rope_scaling": LLAMA3_SCALING}),
    "qwen2": Family("qwen2", "smollm", biases=("attn_q", "attn_k", "attn_v"), config={"model_type": "qwen2"}),
    "qwen3": Family("qwen3", "smollm", norms=[*LLAMA_NORMS, "attn_q_norm", "attn_k_norm"], head=True,
                    config={"model_type": "qwen3"}),
    "phi3": Family("phi3", "smollm", shapes=FUSED_SHAPES, types=FUSED_TYPES, head=True, metadata=phi3_metadata,
                   config={"model_type": "phi3", "partial_rotary_factor": 0.5}),
    "phi3-longrope": Family("phi3", "smollm", shapes=FUSED_SHAPES, types=FUSED_TYPES, head=True, long_rope=True,
                            metadata=phi3_long_rope_metadata,
                            context_length=LONG_ROPE_CONTEXT,
                            config={"model_type": "phi3", "partial_rotary_factor": 0.5, "rope_scaling": LONG_ROPE,
                                    "original_max_position_embeddings": LONG_ROPE_ORIGINAL,
                                    "max_position_embeddings": LONG_ROPE_CONTEXT}),
    "gemma3": Family("gemma3", "gemma", n_layers=6, metadata=gemma3_metadata,  # layer 5 is the one global layer
                     norms=["attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm",
                            "post_ffw_norm"],
                     config={"model_type": "gemma3_text", "sliding_window": 8, "query_pre_attn_scalar": HEAD_DIM,
                             "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0}),
}


def write_model(path: Path, family: Family, vocabulary: Path) -> Path:
    rng = np.random.default_rng(0)
    source = GGUFFile(vocabulary).metadata
    tokens = source["tokenizer.ggml.tokens"]
    writer = GGUFWriter(path, family.architecture)
    writer.add_context_length(family.context_length)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(family.n_layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    family.metadata(writer)
    writer.add_tokenizer_model(source["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(source.get("tokenizer.ggml.pre", "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(source["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in source:
        writer.add_token_scores(source["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in source:
        writer.add_token_merges(source["tokenizer.ggml.merges"])
    writer.add_bos_token_id(source["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(source["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(bool(source.get("tokenizer.ggml.add_bos_token", False)))
    writer.add_add_space_prefix(bool(source.get("tokenizer.ggml.add_space_prefix", False)))

    def norm(size: int, gain: float = 1.0) -> np.ndarray:
        return (gain * (1 + 0.1 * rng.standard_normal(size))).astype(np.float32)

    writer.add_tensor("token_embd.weight", random_tensor(T.Q8_0, len(tokens), HIDDEN, rng), raw_dtype=T.Q8_0)
    writer.add_tensor("output_norm.weight", norm(HIDDEN))
    if family.head:
        writer.add_tensor("output.weight", random_tensor(T.Q6_K, len(tokens), HIDDEN, rng), raw_dtype=T.Q6_K)
    if family.rope_factors:
        writer.add_tensor("rope_freqs.weight", llama3_factors(LLAMA3_SCALING, HEAD_DIM, 10000.0))
    if family.long_rope:
        writer.add_tensor("rope_factors_short.weight", np.array(LONG_ROPE["short_factor"], np.float32))
        writer.add_tensor("rope_factors_long.weight", np.array(LONG_ROPE["long_factor"], np.float32))
    for i in range(family.n_layers):
        for name in family.norms:
            size = HEAD_DIM if name in ("attn_q_norm", "attn_k_norm") else HIDDEN
            writer.add_tensor(f"blk.{i}.{name}.weight", norm(size, ATTENTION_GAIN if name == "attn_norm" else 1.0))
        for name, (rows, cols) in family.shapes.items():
            kind = family.types[name]
            if kind == T.F16:
                weight = (0.05 * rng.standard_normal((rows, cols))).astype(np.float16)
                writer.add_tensor(f"blk.{i}.{name}.weight", weight)
            else:
                writer.add_tensor(f"blk.{i}.{name}.weight", random_tensor(kind, rows, cols, rng), raw_dtype=kind)
            if name in family.biases:
                writer.add_tensor(f"blk.{i}.{name}.bias", (0.5 * rng.standard_normal(rows)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# GGUF's names → Hugging Face's, as llama.cpp's converter maps them (`{}` is the layer).
HF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}
GEMMA_HF_NAMES = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                  "post_ffw_norm": "post_feedforward_layernorm"}


def write_directory(path: Path, gguf: Path, family: Family) -> Path:
    """The tiny GGUF model as a Hugging Face checkpoint: float32 safetensors under Hugging Face's names,
    q and k in Hugging Face's row order, Gemma's norms without their 1, its config and tokenizer files."""
    names = {**HF_NAMES, **(GEMMA_HF_NAMES if family.architecture == "gemma3" else {})}
    if family.architecture == "phi3":
        names["ffn_up"] = "mlp.gate_up_proj"
    weights = {}
    raw = np.memmap(gguf, np.uint8, mode="r")
    for tensor in GGUFFile(gguf).tensors.values():
        if tensor.name.startswith("rope_f"):
            continue  # what the config's rope_scaling says
        data = raw[tensor.offset : tensor.offset + tensor.nbytes]
        if tensor.type in (T.F32, T.F16):
            data = data.view(np.float32 if tensor.type == T.F32 else np.float16)
        values = dequantize(data, tensor.type).reshape(tensor.shape).astype(np.float32)
        stem, kind = tensor.name.rsplit(".", 1)
        if (layer := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)) is not None:
            part = layer.group(2)
            name = f"model.layers.{layer.group(1)}.{names[part]}.{kind}"
            if family.permuted and part in ("attn_q", "attn_k"):  # undo the converter's permutation
                heads = HEADS if part == "attn_q" else KV_HEADS
                values = values.reshape(heads, HEAD_DIM // 2, 2, -1).swapaxes(1, 2).reshape(values.shape)
        else:
            part, name = stem, f"{names[stem]}.{kind}"
        if family.architecture == "gemma3" and "norm" in part:
            values = values - 1
        weights[name] = mx.array(values)
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    tokenizer = load_tokenizer(gguf)[0]
    tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokenizer.backend.id_to_token(tokenizer.bos_id), "add_bos_token": tokenizer.add_bos,
        "eos_token": tokenizer.backend.id_to_token(tokenizer.eos_ids[0])}))
    (path / "config.json").write_text(json.dumps({
        "hidden_size": HIDDEN, "num_hidden_layers": family.n_layers, "intermediate_size": FFN,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": tokenizer.backend.get_vocab_size(), "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": not family.head, "max_position_embeddings": 512, **family.config}))
    return path


@pytest.fixture(params=[(name, form) for name in FAMILIES for form in ("gguf", "directory")],
                ids=lambda param: "-".join(param))
def tiny(request: pytest.FixtureRequest, tmp_path: Path, model_path: Path,
         gemma_path: Path) -> Iterator[tuple[Path, Path]]:
    """The tiny model as exo reads it (its GGUF file or Hugging Face directory), and its GGUF file for llama.cpp."""
    with tiny_model(*request.param, tmp_path, model_path, gemma_path) as paths:
        yield paths


@contextmanager
def tiny_model(name: str, form: str, tmp_path: Path, model_path: Path,
               gemma_path: Path) -> Iterator[tuple[Path, Path]]:
    family = FAMILIES[name]
    gguf = write_model(tmp_path / f"tiny-{name}.gguf", family,
                       gemma_path if family.vocabulary == "gemma" else model_path)
    if form == "gguf":
        yield gguf, gguf
    else:
        directory = write_directory(tmp_path / f"tiny-{name}", gguf, family)
        yield directory, gguf
        shutil.rmtree(directory)
    gguf.unlink()


def test_logits_match_llama_cpp_at_every_position(tiny: tuple[Path, Path]) -> None:
    assert_logits_match_llama_cpp(*tiny, context=128)


def assert_logits_match_llama_cpp(path: Path, gguf: Path, *, context: int) -> None:
    """exo's logits for TEXT from the model at `path`, serving `context` positions, against llama.cpp's
    from `gguf` with a context of that size."""
    model = load(path, context=context)
    ids = model.tokenizer.encode(TEXT)
    ours = np.array(model.model(mx.array(ids)[None], model.model.make_cache())[0], dtype=np.float32)
    with open_llama_cpp(gguf, n_ctx=context, n_threads=2, logits_all=True) as llm:
        assert llm.tokenize(TEXT.encode(), add_bos=True, special=True) == ids
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    spread = ours.std(axis=1, keepdims=True)
    error = np.abs(ours - theirs) / spread
    assert error.mean() < MEAN_TOLERANCE and error.max() < MAX_TOLERANCE, (error.mean(), error.max())
    # at every position, llama.cpp's top token is exo's, or ties with it within that position's noise
    rows = np.arange(len(ids))
    gap = ours.max(axis=1) - ours[rows, theirs.argmax(axis=1)]
    noise = np.abs(ours - theirs).max(axis=1)
    assert (gap <= 2 * noise).all(), (gap, noise)
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).mean() >= 0.75


# A tied and an untied head, Llama 3's rope_freqs tensor, fused projections, Gemma's last range (its head is
# always the embedding); both forms. The first and the last range: the ones that hold more than layers.
@pytest.mark.parametrize(("name", "form"), [("llama", "gguf"), ("llama3", "gguf"), ("llama3", "directory"),
                                            ("phi3", "gguf"), ("gemma3", "gguf")])
def test_each_range_loads_alike_from_a_copy_holding_only_the_pieces_its_manifest_names(
        name: str, form: str, tmp_path: Path, model_path: Path, gemma_path: Path) -> None:
    """What a node lacking the files fetches from one that has them (exo/models/peers.py) is all a range
    reads: a sparse copy with only the manifest's pieces loads to the same weights as the original."""
    with tiny_model(name, form, tmp_path, model_path, gemma_path) as (path, _):
        n = FAMILIES[name].n_layers
        for layers in [(0, 1), (n - 1, n)]:
            _check_copy(path, layers, tmp_path)


def _check_copy(path: Path, layers: tuple[int, int], tmp_path: Path) -> None:
    manifest = ModelServer(lambda: {"tiny": path}, piece_bytes=4096).manifest("tiny", layers)
    copy = tmp_path / f"copy-{layers[0]}"
    copy.mkdir()
    for file in manifest.files:
        source = path if path.is_file() else path / file.name
        with source.open("rb") as src, (copy / file.name).open("wb") as dst:
            dst.truncate(file.size)
            for piece in file.pieces:
                src.seek(piece.offset)
                dst.seek(piece.offset)
                dst.write(src.read(piece.length))
    held = sum(p.length for f in manifest.files for p in f.pieces)
    assert held < sum(f.size for f in manifest.files), "the range's pieces, not the whole model"
    copied = load(copy / manifest.files[0].name if manifest.is_file else copy, *layers).model
    original = load(path, *layers).model
    ours, theirs = dict(tree_flatten(copied.parameters())), dict(tree_flatten(original.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in ours), layers
    shutil.rmtree(copy)


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_a_sliding_window_from_the_config_lets_each_position_see_only_its_last_positions(
        name: str, tmp_path: Path, model_path: Path) -> None:
    """Mistral 7B v0.1's and Phi 3's window. With one layer, and rotary embeddings that see only relative
    positions, a windowed position's logits are those of the last position of its window run alone;
    decoding one position at a time gives the same as the prompt at once."""
    window = 4
    base = replace(FAMILIES[name], n_layers=1)
    model_type = "mistral" if name == "llama" else "phi3"
    windowed = replace(base, config={**base.config, "model_type": model_type, "sliding_window": window})
    gguf = write_model(tmp_path / f"tiny-{name}.gguf", base, model_path)
    model = load(write_directory(tmp_path / "windowed", gguf, windowed)).model
    full = load(write_directory(tmp_path / "full", gguf, base)).model
    ids = mx.array(load(gguf).tokenizer.encode(TEXT))
    assert model.args.sliding_window == window and len(ids) > 2 * window

    def logits(m: LayerRange, tokens: mx.array) -> np.ndarray:
        return np.array(m(tokens[None], m.make_cache())[0], dtype=np.float32)

    whole = logits(model, ids)
    alone = np.stack([logits(model, ids[max(0, p - window + 1): p + 1])[-1] for p in range(len(ids))])
    np.testing.assert_allclose(whole, alone, atol=2e-4 * np.abs(whole).max())
    cache = model.make_cache()
    stepped = np.concatenate([np.array(model(ids[None, p: p + 1], cache)[0], dtype=np.float32)
                              for p in range(len(ids))])
    np.testing.assert_allclose(stepped, whole, atol=2e-4 * np.abs(whole).max())
    unwindowed = logits(full, ids)
    np.testing.assert_allclose(unwindowed[:window], whole[:window], atol=2e-4 * np.abs(whole).max())
    assert np.abs(unwindowed[window:] - whole[window:]).max() > 0.05 * np.abs(whole).max()  # the window bites


def test_qwen_configs_name_a_window_they_do_not_use() -> None:
    config = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
              "vocab_size": 100, "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28}
    assert ModelArgs.from_dict(config).sliding_window is None
    assert ModelArgs.from_dict({**config, "use_sliding_window": True, "max_window_layers": 0}).sliding_window == 32768
    with pytest.raises(ModelFormatError, match="sliding windows on only some layers"):
        ModelArgs.from_dict({**config, "use_sliding_window": True, "max_window_layers": 1})


@pytest.mark.parametrize("form", ["gguf", "directory"])
def test_longrope_beyond_the_original_context_takes_the_long_factors_as_llama_cpp_does(
        form: str, tmp_path: Path, model_path: Path, gemma_path: Path) -> None:
    """Served within the original context (the matrix above, 128 positions) the short factors apply;
    beyond it, the long ones, in exo as in llama.cpp."""
    with tiny_model("phi3-longrope", form, tmp_path, model_path, gemma_path) as (path, gguf):
        short, long = load(path, context=LONG_ROPE_ORIGINAL).args, load(path, context=512).args
        np.testing.assert_allclose(short.rope_factors, LONG_ROPE["short_factor"], rtol=1e-6)  # GGUF's: float32
        np.testing.assert_allclose(long.rope_factors, LONG_ROPE["long_factor"], rtol=1e-6)
        assert short.rope_scale == long.rope_scale == pytest.approx(math.sqrt(2))
        assert_logits_match_llama_cpp(path, gguf, context=512)


def test_rotary_scaling_exo_cannot_apply_is_refused_by_name(tmp_path: Path, model_path: Path) -> None:
    family = FAMILIES["llama"]
    gguf = write_model(tmp_path / "tiny-llama.gguf", family, model_path)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    directory = write_directory(tmp_path / "tiny-llama", gguf, replace(family, config={
        **family.config, "rope_scaling": yarn}))
    with pytest.raises(ModelFormatError, match="tiny-llama: rope scaling 'yarn' is not supported"):
        load(directory)
