"""The engine's building blocks over exo.kernels: linear layers with weights kept as stored, and RMSNorm.

A quantized layer holds MLX's affine format (packed `weight`, per-group `scales` and `biases`) and
multiplies through `exo.kernels.quantized_matmul`, so whichever code path the kernels picked runs
every matmul on quantized weights.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from exo import kernels


class _Quantized(nn.Module):
    """A `[rows, cols]` matrix held quantized, read by `x @ W.T`."""

    def __init__(self, rows: int, cols: int, *, group_size: int, bits: int) -> None:
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((rows, cols * bits // 32), mx.uint32)
        self.scales = mx.zeros((rows, cols // group_size), mx.float16)
        self.biases = mx.zeros((rows, cols // group_size), mx.float16)
        self.freeze()

    def matmul(self, x: mx.array) -> mx.array:
        return kernels.quantized_matmul(x, self.weight, self.scales, self.biases,
                                        group_size=self.group_size, bits=self.bits)


class QuantizedLinear(_Quantized):
    """`x @ W.T (+ bias)` with `W` `[out, in]` held quantized and the bias, where there is one, in float."""

    def __init__(self, in_dims: int, out_dims: int, *, group_size: int, bits: int, bias: bool = False) -> None:
        super().__init__(out_dims, in_dims, group_size=group_size, bits=bits)
        if bias:
            self.bias = mx.zeros((out_dims,))
            self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.matmul(x)
        return y + self.bias if "bias" in self else y


class QuantizedEmbedding(_Quantized):
    """A token embedding held quantized; `as_linear` is the tied output head."""

    def __init__(self, num_embeddings: int, dims: int, *, group_size: int, bits: int) -> None:
        super().__init__(num_embeddings, dims, group_size=group_size, bits=bits)

    def __call__(self, ids: mx.array) -> mx.array:
        # in float32, whatever the scales are stored as: fp16 arithmetic would round the rows
        return mx.dequantize(self.weight[ids], self.scales[ids].astype(mx.float32),
                             self.biases[ids].astype(mx.float32), group_size=self.group_size, bits=self.bits)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.matmul(x)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.rms_norm(x, self.weight, self.eps)


def quantize(model: nn.Module, quantization: dict[str, tuple[int, int]]) -> None:
    """Swap the `nn.Linear` and `nn.Embedding` layers named in `quantization` (path → group size, bits)
    for their quantized forms, so the stored weights load into them as they are."""

    def swap(path: str, module: nn.Module) -> nn.Module:
        if path not in quantization:
            return module
        group_size, bits = quantization[path]
        if isinstance(module, nn.Linear):
            out_dims, in_dims = module.weight.shape
            return QuantizedLinear(in_dims, out_dims, group_size=group_size, bits=bits, bias="bias" in module)
        if isinstance(module, nn.Embedding):
            n, dims = module.weight.shape
            return QuantizedEmbedding(n, dims, group_size=group_size, bits=bits)
        raise ValueError(f"{path} is a {type(module).__name__}, which exo does not hold quantized")

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
