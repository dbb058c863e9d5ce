import mlx.core as mx
import pytest

from exo import kernels


def _weights(n, k, bits, group_size, scale_dtype=mx.float32):
    w, scales, biases = mx.quantize(mx.random.normal((n, k)), group_size=group_size, bits=bits)
    return w, scales.astype(scale_dtype), biases.astype(scale_dtype)


def _int8(x, group_size):
    """x as the VNNI kernels read it: each group rounded to 255 steps of its largest magnitude / 127."""
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    amax = mx.max(mx.abs(groups), axis=-1, keepdims=True)
    steps = mx.round(groups * mx.where(amax > 0, 127.0 / amax, 0.0))
    return (steps * (amax / 127.0)).reshape(x.shape)


def _check(x, w, scales, biases, group_size, bits):
    got = kernels.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    exact = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
    assert got.shape == exact.shape and got.dtype == exact.dtype
    want, native = exact, kernels.info().path != "stock" and bits in (4, 8) and x.dtype == mx.float32
    if native and kernels.info().path == "avx512vnni":  # the weights meet x rounded to int8, group by group
        x = x.reshape(-1, x.shape[-1])  # dense, so the rounding reads the same groups
        want = mx.quantized_matmul(_int8(x, group_size), w, scales, biases, transpose=True, group_size=group_size,
                                   bits=bits).reshape(got.shape)
        # which moves each product by at most half a step of its group of x
        step = mx.repeat(mx.max(mx.abs(x.reshape(-1, x.shape[-1] // group_size, group_size)), axis=-1) / 127.0,
                         group_size, axis=-1)
        w_abs = mx.abs(mx.dequantize(w, scales, biases, group_size=group_size, bits=bits))
        assert mx.all(mx.abs(got - exact).reshape(-1, got.shape[-1]) <= 0.5 * step @ w_abs.T + 1e-4).item()
    # float32 sums in another order: error grows with the magnitude of the terms summed
    bound = 1e-5 * (mx.abs(x) @ mx.abs(mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)).T) + 1e-5
    bound = bound.reshape(got.shape)
    assert mx.all(mx.abs(got - want) <= bound).item(), mx.abs(got - want).max().item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 64])
def test_matches_mlx_for_every_width_group_and_row_count(path, bits, group_size, rows):
    mx.random.seed(rows * 100 + bits + group_size)
    w, scales, biases = _weights(136, 384, bits, group_size)
    _check(mx.random.normal((rows, 384)), w, scales, biases, group_size, bits)


@pytest.mark.parametrize("n,k", [(8, 128), (1000, 640), (4104, 256)])
def test_odd_sizes_and_matrices_big_enough_for_threads(path, n, k):
    mx.random.seed(n)
    w, scales, biases = _weights(n, k, 4, 64)
    _check(mx.random.normal((5, k)), w, scales, biases, 64, 4)
    _check(mx.random.normal((1, k)), w, scales, biases, 64, 4)


def test_a_prefill_chunk(path):
    mx.random.seed(7)
    w, scales, biases = _weights(576, 576, 4, 32)
    _check(mx.random.normal((1, 200, 576)), w, scales, biases, 32, 4)


def test_batched_transposed_and_sliced_activations(path):
    mx.random.seed(3)
    w, scales, biases = _weights(96, 256, 4, 64)
    _check(mx.random.normal((256, 6)).T, w, scales, biases, 64, 4)  # columns of a matrix
    _check(mx.random.normal((2, 7, 512))[:, 1::2, ::2], w, scales, biases, 64, 4)  # strided rows and elements
    _check(mx.random.normal((2, 3, 256)), w, scales, biases, 64, 4)


@pytest.mark.parametrize("scale_dtype", [mx.float16, mx.bfloat16])
def test_half_precision_scales(path, scale_dtype):
    mx.random.seed(5)
    w, scales, biases = _weights(64, 256, 8, 32, scale_dtype)
    _check(mx.random.normal((2, 256)), w, scales, biases, 32, 8)


def test_what_native_code_does_not_handle_goes_to_mlx(path):
    mx.random.seed(9)
    w, scales, biases = _weights(64, 256, 2, 64)  # 2 bits
    _check(mx.random.normal((3, 256)), w, scales, biases, 64, 2)
    w, scales, biases = _weights(64, 256, 4, 64, mx.float16)
    x = mx.random.normal((3, 256)).astype(mx.float16)
    got = kernels.quantized_matmul(x, w, scales, biases, group_size=64, bits=4)
    want = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4)
    assert got.dtype == mx.float16 and mx.allclose(got, want).item()


def test_mismatched_shapes_are_a_clear_error(path):
    w, scales, biases = _weights(64, 256, 4, 64)
    with pytest.raises(ValueError, match="match"):
        mx.eval(kernels.quantized_matmul(mx.zeros((1, 128)), w, scales, biases, group_size=64, bits=4))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [2, 3, 4, 7, 8])
def test_each_row_of_a_decode_batch_is_what_it_is_alone(path, bits, group_size, rows):
    """Batched decoding gives each sequence the tokens it gets alone only if its row's sums do not
    depend on the rows beside it: bit for bit, up to the 8 rows a batch holds."""
    mx.random.seed(rows + bits + group_size)
    w, scales, biases = _weights(136, 2048, bits, group_size)
    x = mx.random.normal((rows, 2048))
    together = kernels.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    for r in range(rows):
        alone = kernels.quantized_matmul(x[r:r + 1], w, scales, biases, group_size=group_size, bits=bits)
        assert mx.array_equal(together[r:r + 1], alone).item(), (r, mx.abs(together[r:r + 1] - alone).max().item())
