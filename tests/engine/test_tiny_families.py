"""Tiny random-weight models of each family, written by the test with the gguf package's writer (the
real models' vocabularies, every tensor of a different GGUF type as Q4_K_M files mix them), read by
exo and by llama.cpp: the logits at every position within a stated tolerance of llama.cpp's, and the
same top token at every position but where the two engines' own noise can reorder a near-tie."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T

from exo.engine.gguf import GGUFFile
from exo.engine.loading import load

pytest.importorskip("llama_cpp")
from llama_cpp_reference import reference  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 256, 4, 2, 64, 512  # rows of 256: whole K-quant super-blocks
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."
# llama.cpp multiplies with its activations quantized to 8 bits; exo keeps them float32. As fractions of
# the logits' spread (their standard deviation over the vocabulary) at each position; measured: mean
# 0.008 and largest 0.053 (llama, 2 layers), mean 0.02 and largest 0.153 (gemma3, 6 layers), the same
# at every position (so nothing but that noise: a window or mask error would grow past the window).
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


def write_model(path: Path, architecture: str, n_layers: int, vocabulary: Path, types: dict[str, T],
                extra: Callable[[GGUFWriter], None], norms: list[str]) -> Path:
    rng = np.random.default_rng(0)
    source = GGUFFile(vocabulary).metadata
    tokens = source["tokenizer.ggml.tokens"]
    writer = GGUFWriter(path, architecture)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    extra(writer)
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

    shapes = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    writer.add_tensor("token_embd.weight", random_tensor(T.Q8_0, len(tokens), HIDDEN, rng), raw_dtype=T.Q8_0)
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for i in range(n_layers):
        for name in norms:
            size = HEAD_DIM if name.endswith(("q_norm", "k_norm")) else HIDDEN
            writer.add_tensor(f"blk.{i}.{name}.weight", (1 + 0.1 * rng.standard_normal(size)).astype(np.float32))
        for name, (rows, cols) in shapes.items():
            kind = types[name]
            if kind == T.F16:
                weight = (0.05 * rng.standard_normal((rows, cols))).astype(np.float16)
                writer.add_tensor(f"blk.{i}.{name}.weight", weight)
            else:
                writer.add_tensor(f"blk.{i}.{name}.weight", random_tensor(kind, rows, cols, rng), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# q and k 4-bit beside an 8-bit v (a Q4_K_M file's mix), gate and up of different 8-bit types.
TYPES = {"attn_q": T.Q4_K, "attn_k": T.Q4_0, "attn_v": T.Q6_K, "attn_output": T.F16,
         "ffn_gate": T.Q5_0, "ffn_up": T.Q5_1, "ffn_down": T.Q4_1}


def tiny_llama(path: Path, vocabulary: Path) -> Path:
    def extra(writer: GGUFWriter) -> None:
        writer.add_rope_freq_base(10000.0)
        writer.add_rope_dimension_count(HEAD_DIM)
    return write_model(path, "llama", 2, vocabulary, TYPES, extra, ["attn_norm", "ffn_norm"])


def tiny_gemma3(path: Path, vocabulary: Path) -> Path:
    def extra(writer: GGUFWriter) -> None:
        writer.add_rope_freq_base(1_000_000.0)
        writer.add_sliding_window(8)  # shorter than the prompt: the local layers' window is exercised
    return write_model(path, "gemma3", 6, vocabulary, TYPES, extra,  # layer 5 is the one global layer
                       ["attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm",
                        "post_ffw_norm"])


@pytest.fixture(params=["llama", "gemma3"])
def tiny(request: pytest.FixtureRequest, tmp_path: Path, model_path: Path, gemma_path: Path) -> Iterator[Path]:
    if request.param == "llama":
        path = tiny_llama(tmp_path / "tiny-llama.gguf", model_path)
    else:
        path = tiny_gemma3(tmp_path / "tiny-gemma3.gguf", gemma_path)
    yield path
    path.unlink()


def test_logits_match_llama_cpp_at_every_position(tiny: Path) -> None:
    model = load(tiny)
    ids = model.tokenizer.encode(TEXT)
    ours = np.array(model.model(mx.array(ids)[None], model.model.make_cache())[0], dtype=np.float32)
    with reference(tiny, n_ctx=128, n_threads=2, logits_all=True) as llm:
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
