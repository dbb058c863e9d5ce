"""GGUF files: the header parsed here, each tensor's blocks read with the layouts and dequantizer of
llama.cpp's own `gguf` package, one tensor at a time.

Quantized tensors become MLX's affine format (`w = scale * q + bias`, groups of 32, codes packed into
uint32 with the first element in the lowest bits), which exo.kernels multiplies as it is:

- exactly: Q4_0, Q4_1 and Q4_K as 4 bits; Q5_0, Q5_1, Q5_K and Q8_0 as 8 bits. Their blocks are affine
  over 32 elements already. fp16 scales where they are the file's own (Q4_0 to Q8_0), float32 where
  they are products of two (K-quants: super-block scale times sub-block scale), so nothing rounds.
- as close as 8 bits in groups of 32 come: everything else the reader can dequantize (Q6_K, Q2_K, Q3_K,
  IQ types: sub-blocks of 16 or codebooks, which no affine group of 32 holds exactly). The added error
  is at most half an 8-bit step of the group's range: a small fraction of the source's own step.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from exo.shared.errors import ModelFormatError

GROUP_SIZE = 32
_FLOATS = {T.F32: (np.float32, mx.float32), T.F16: (np.float16, mx.float16), T.BF16: (np.uint16, mx.bfloat16)}
# GGUF's metadata value types: fixed-size scalars by their struct code; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # rows first, as the engine holds it (GGUF lists the row length first)
    type: T
    offset: int  # from the start of the file
    nbytes: int


class GGUFFile:
    """A GGUF file's metadata and tensor directory, read at once; tensors converted when asked for.
    The header is parsed here rather than with gguf.GGUFReader, which builds an array per vocabulary
    entry and takes seconds on a 262k-token vocabulary."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise self._error("it is not a GGUF file")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.metadata, self.tensors = self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, ValueError) as e:
            raise self._error(f"it is cut short or damaged (an incomplete download or a damaged copy: {e})") from e

    def _error(self, why: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path.name} is not a model exo can serve: {why}")

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def _parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        buf, at = self._map, 4

        def take(code: str) -> Any:
            nonlocal at
            (value,) = struct.unpack_from("<" + code, buf, at)
            at += struct.calcsize(code)
            return value

        def string() -> str:
            nonlocal at
            n = take("Q")
            if at + n > len(buf):
                raise ValueError("a string runs past the end of the file")
            text = buf[at : at + n].decode()
            at += n
            return text

        def value(kind: int) -> Any:
            nonlocal at
            if kind in _SCALARS:
                return take(_SCALARS[kind])
            if kind == _STRING:
                return string()
            if kind != _ARRAY:
                raise ValueError(f"unknown metadata type {kind}")
            item, n = take("I"), take("Q")
            if item in _SCALARS and item != 7:  # numbers in one read (vocabulary scores and types)
                dtype = np.dtype("<" + _SCALARS[item])
                if at + n * dtype.itemsize > len(buf):
                    raise ValueError("an array runs past the end of the file")
                values = np.frombuffer(buf, dtype, n, at).tolist()
                at += n * dtype.itemsize
                return values
            return [value(item) for _ in range(n)]

        version = take("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (exo reads versions 2 and 3)")
        n_tensors, n_fields = take("Q"), take("Q")
        metadata = {}
        for _ in range(n_fields):
            key = string()
            metadata[key] = value(take("I"))
        layout = []
        for _ in range(n_tensors):
            name = string()
            dims = [take("Q") for _ in range(take("I"))]
            type_id, offset = take("I"), take("Q")
            try:
                kind = T(type_id)
            except ValueError:
                raise self._error(f"its tensor {name} is of ggml type {type_id}, "
                                  "a tensor type exo cannot read") from None
            layout.append((name, tuple(reversed(dims)), kind, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = at + -at % alignment
        tensors = {}
        for name, shape, kind, offset in layout:
            block, block_bytes = GGML_QUANT_SIZES[kind]
            count = int(np.prod(shape))
            if shape[-1] % block:
                raise ValueError(f"tensor {name}'s rows of {shape[-1]} are not whole {kind.name} blocks")
            nbytes = count // block * block_bytes
            if data_start + offset + nbytes > len(buf):
                raise ValueError(f"tensor {name} extends past the end of the file")
            tensors[name] = TensorInfo(name, shape, kind, data_start + offset, nbytes)
        return metadata, tensors

    def floats(self, name: str) -> np.ndarray:
        """Float tensor `name` as float32 numpy values."""
        info = self.tensors[name]
        if info.type not in _FLOATS:
            raise self._error(f"its tensor {name} is {info.type.name}, not a float type")
        values = np.frombuffer(self._map, np.uint8, info.nbytes, info.offset).view(_FLOATS[info.type][0])
        if info.type == T.BF16:  # the high half of a float32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values.reshape(info.shape).astype(np.float32)

    def tensor(self, name: str) -> dict[str, mx.array]:
        """Tensor `name` converted: `weight` alone (float), or `weight`, `scales` and `biases` (affine)."""
        info = self.tensors[name]
        data = np.frombuffer(self._map, np.uint8, info.nbytes, info.offset)
        if info.type in _FLOATS:
            numpy_type, mlx_type = _FLOATS[info.type]
            return {"weight": mx.array(data.view(numpy_type).reshape(info.shape)).view(mlx_type)}
        convert = _EXACT.get(info.type)
        if convert is None:
            try:
                values = dequantize(data, info.type)
            except NotImplementedError as e:
                raise self._error(f"its tensor {name} is of type {info.type.name}, a tensor type exo cannot "
                                  "read") from e
            return _requantized(values.reshape(info.shape).astype(np.float32))
        codes, scales, biases, bits = convert(data.reshape(-1, GGML_QUANT_SIZES[info.type][1]))
        return _affine(codes, scales, biases, bits, info.shape)


def _affine(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
            shape: tuple[int, ...]) -> dict[str, mx.array]:
    """Codes (uint8, one per element) and per-group scales and biases as MLX's affine tensor of `shape`:
    codes packed into uint32 words, the first element in the lowest bits."""
    rows = int(np.prod(shape[:-1]))
    codes = codes.reshape(rows, -1)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"weight": mx.array(np.ascontiguousarray(codes, dtype=np.uint8).view(np.uint32)),
            "scales": mx.array(scales.reshape(rows, -1)), "biases": mx.array(biases.reshape(rows, -1))}


def _requantized(values: np.ndarray) -> dict[str, mx.array]:
    """`values` as 8-bit affine groups of 32 spanning each group's range (error at most half a step:
    mx.quantize's grid, fitted to keep zero exact, errs up to a whole one)."""
    groups = values.reshape(-1, GROUP_SIZE)
    low, high = groups.min(axis=1, keepdims=True), groups.max(axis=1, keepdims=True)
    step = (high - low) / 255
    step[step == 0] = 1  # a constant group: every code 0, the bias its value
    codes = np.rint((groups - low) / step).clip(0, 255).astype(np.uint8)
    return _affine(codes, step, low, 8, values.shape)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16)  # [n, 1]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Blocks of 16 bytes → 32 codes: the low nibbles are elements 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32-bit `qh` → bit j of element j, as 0 or 16."""
    word = qh.copy().view(np.uint32)  # [n, 1]
    return (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = _f16(b, 0)
    return (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, d * np.float16(-128), 8


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18]), d, d * np.float16(-8), 4


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, ...]:
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2), 4


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = _f16(b, 0)
    return _nibbles(b[:, 6:22]) | _fifth_bits(b[:, 2:6]), d, d * np.float16(-16), 8


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, ...]:
    return _nibbles(b[:, 8:24]) | _fifth_bits(b[:, 4:8]), _f16(b, 0), _f16(b, 2), 8


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A K-quant super-block's eight 6-bit (scale, min) pairs, as float32 products with d and dmin."""
    s = b[:, 4:16]
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    d, dmin = _f16(b, 0).astype(np.float32), _f16(b, 2).astype(np.float32)
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, ...]:
    qs = b[:, 16:144].reshape(-1, 4, 32)  # four chunks of 64: low nibbles one sub-block, high the next
    codes = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 256)
    scales, biases = _k_scales(b)
    return codes, scales, biases, 4


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, ...]:
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(-1, 4, 32)
    high = ((qh[:, None, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)) & 1) << 4
    codes = (np.stack([qs & 0xF, qs >> 4], axis=2) | high).reshape(-1, 256)
    scales, biases = _k_scales(b)
    return codes, scales, biases, 8


_EXACT = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q4_K: _q4_k, T.Q5_K: _q5_k}
