"""Every GGUF tensor type llama.cpp's reader can dequantize, converted by exo.engine.gguf: the types whose
blocks are affine over 32 elements bit-exactly, the rest within half an 8-bit step of each group's range.
The tensors are random blocks written to a real GGUF file with the gguf package's writer; the reference
is that package's own dequantizer."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from exo.engine.gguf import GROUP_SIZE, GGUFFile

EXACT = {T.Q4_0: 4, T.Q4_1: 4, T.Q4_K: 4, T.Q5_0: 8, T.Q5_1: 8, T.Q5_K: 8, T.Q8_0: 8}
CLOSE = [T.Q2_K, T.Q3_K, T.Q6_K, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S,
         T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0]
ROWS, COLS = 6, 512  # two K-quant super-blocks per row


def random_blocks(kind: T, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random bytes as `kind`'s blocks, redrawn where a random fp16 scale is infinite or NaN; and what
    llama.cpp's dequantizer makes of them."""
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (ROWS * COLS // block, size), dtype=np.uint8)
    while True:
        values = dequantize(raw, kind).reshape(len(raw), block)
        bad = ~np.isfinite(values).all(axis=1) | (np.abs(values) > 1e4).any(axis=1)
        if not bad.any():
            return raw.reshape(ROWS, -1), values.reshape(ROWS, COLS)
        raw[bad] = rng.integers(0, 256, (int(bad.sum()), size), dtype=np.uint8)


def converted(kind: T, raw: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, int]:
    path = tmp_path / f"{kind.name}.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("t", raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parts = GGUFFile(path).tensor("t")
    w, scales, biases = parts["weight"], parts["scales"], parts["biases"]
    bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
    values = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=GROUP_SIZE, bits=bits)
    path.unlink()
    return np.array(values), bits


@pytest.mark.parametrize("kind", EXACT, ids=lambda k: k.name)
def test_affine_types_convert_bit_exactly(kind: T, tmp_path: Path) -> None:
    raw, reference = random_blocks(kind, np.random.default_rng(int(kind)))
    values, bits = converted(kind, raw, tmp_path)
    assert bits == EXACT[kind]
    np.testing.assert_array_equal(values, reference)


@pytest.mark.parametrize("kind", CLOSE, ids=lambda k: k.name)
def test_other_types_convert_within_half_an_8_bit_step(kind: T, tmp_path: Path) -> None:
    raw, reference = random_blocks(kind, np.random.default_rng(int(kind)))
    values, bits = converted(kind, raw, tmp_path)
    assert bits == 8
    groups = reference.reshape(-1, GROUP_SIZE)
    half_step = (groups.max(axis=1) - groups.min(axis=1)) / 255 / 2
    error = np.abs(values.reshape(-1, GROUP_SIZE) - groups).max(axis=1)
    rounding = 1e-6 * np.abs(groups).max(axis=1)  # float32 arithmetic in both dequantizers
    assert (error <= half_step + rounding).all(), (error / np.maximum(half_step, 1e-30)).max()


def test_float_types_are_kept_as_they_are(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "floats.gguf"
    writer = GGUFWriter(path, "llama")
    tensors = {"f32": rng.standard_normal((3, 64)).astype(np.float32),
               "f16": rng.standard_normal((3, 64)).astype(np.float16)}
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = GGUFFile(path)
    for name, value in tensors.items():
        [weight] = file.tensor(name).values()
        assert weight.dtype == {"f32": mx.float32, "f16": mx.float16}[name]
        np.testing.assert_array_equal(np.array(weight), value)
