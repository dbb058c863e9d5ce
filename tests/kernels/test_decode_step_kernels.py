"""rms_norm, rope, cache_append and attention against stock MLX on each path."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from exo import kernels


def _close(got, want, tol=2e-5):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert mx.allclose(got, want, rtol=tol, atol=tol).item(), mx.abs(got - want).max().item()


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 100), (2, 5, 4, 33)])
def test_rms_norm_matches_mlx(path, shape):
    mx.random.seed(len(shape))
    x, w = mx.random.normal(shape), mx.random.normal((shape[-1],))
    _close(kernels.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5))
    xt = mx.random.normal((shape[-1], 6)).T  # rows that are columns of a matrix
    _close(kernels.rms_norm(xt, w, 1e-6), mx.fast.rms_norm(xt, w, 1e-6))


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims,d", [(64, 64), (32, 48)])
@pytest.mark.parametrize("offset", [0, 37, mx.array(300)])
def test_rope_matches_mlx(path, traditional, dims, d, offset):
    mx.random.seed(dims + d)
    x = mx.random.normal((2, 5, 3, d)).transpose(0, 2, 1, 3)  # [B, H, L, D] as attention makes it
    got = kernels.rope(x, dims=dims, traditional=traditional, base=10000.0, scale=0.5, offset=offset)
    want = mx.fast.rope(x, dims, traditional=traditional, base=10000.0, scale=0.5, offset=offset)
    _close(got, want, 1e-4)  # angles of positions in the hundreds: float32 sin/cos from other code


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("offset", [0, 37, mx.array(300)])
def test_rope_with_rescaled_frequencies_matches_mlx(path, traditional, offset):
    """Each frequency divided by its own factor (Llama 3's scaling), over part of each head."""
    x = mx.random.normal((1, 4, 3, 48))
    periods = 10000.0 ** (mx.arange(0, 32, 2) / 32) * mx.linspace(1, 8, 16)
    got = kernels.rope(x, dims=32, traditional=traditional, base=10000.0, offset=offset, periods=periods)
    want = mx.fast.rope(x, 32, traditional=traditional, base=None, scale=1.0, offset=offset, freqs=periods)
    _close(got, want, 1e-4)


def test_rope_of_a_prefill_chunk(path):
    x = mx.random.normal((1, 9, 128, 64))
    _close(kernels.rope(x, dims=64, traditional=False, base=100000.0, offset=5),
           mx.fast.rope(x, 64, traditional=False, base=100000.0, scale=1.0, offset=5), 1e-4)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_cache_append_writes_each_position_in_turn(path, dtype):
    cache = mx.zeros((1, 3, 16, 8), dtype=dtype)
    mx.eval(cache)
    want = mx.zeros((1, 3, 16, 8), dtype=dtype)
    offset = 0
    for n in (5, 1, 1, 4):
        new = mx.random.normal((1, n, 3, 8)).transpose(0, 2, 1, 3).astype(dtype)  # not contiguous
        cache = kernels.cache_append(cache, new, offset)
        want[..., offset : offset + n, :] = new
        offset += n
        assert mx.array_equal(cache, want).item()


def test_cache_append_refuses_positions_past_the_capacity(path):
    with pytest.raises(ValueError):
        mx.eval(kernels.cache_append(mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 3, 8)), 2))


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("length", [1, 17, 300])
def test_decode_attention_matches_mlx(path, hq, hkv, length):
    mx.random.seed(hq * length)
    keys, values = mx.random.normal((2, hkv, 320, 64)), mx.random.normal((2, hkv, 320, 64))
    q = mx.random.normal((2, 1, hq, 64)).transpose(0, 2, 1, 3)
    got = kernels.attention(q, keys, values, length=length, scale=0.125)
    want = mx.fast.scaled_dot_product_attention(q, keys[..., :length, :], values[..., :length, :], scale=0.125)
    _close(got, want, 1e-5)


@pytest.mark.parametrize("d", [64, 13])
@pytest.mark.parametrize("length", [1, 300])
def test_decode_attention_over_a_float16_cache_reads_it_as_float32(path, d, length):
    mx.random.seed(length + d)
    keys, values = (mx.random.normal((1, 2, 320, d)).astype(mx.float16) for _ in range(2))
    q = mx.random.normal((1, 6, 1, d))
    got = kernels.attention(q, keys, values, length=length, scale=0.125)
    wide = [a[..., :length, :].astype(mx.float32) for a in (keys, values)]
    assert got.dtype == mx.float32
    _close(got, mx.fast.scaled_dot_product_attention(q, *wide, scale=0.125), 1e-5)
    keys_t = mx.random.normal((1, 2, d, 320)).astype(mx.float16).transpose(0, 1, 3, 2)  # positions not rows
    _close(kernels.attention(q, keys_t, values, length=length, scale=0.125),
           mx.fast.scaled_dot_product_attention(q, keys_t[..., :length, :].astype(mx.float32), wide[1], scale=0.125),
           1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu_approx"])
@pytest.mark.parametrize("shape", [(1, 1, 3072), (1, 200, 1536), (3, 7, 34)])
def test_gated_activation_matches_mlx(path, activation, shape):
    mx.random.seed(shape[1])
    gate_up = mx.random.normal(shape) * 4  # out to where exp over- and underflows
    gate_up = mx.concatenate([gate_up[..., :2], mx.array([-100.0, 100.0])[None, None].astype(gate_up.dtype)
                              * mx.ones((*shape[:2], 2)), gate_up[..., 4:]], axis=-1)
    gate, up = mx.split(gate_up, 2, axis=-1)
    want = (nn.silu(gate) if activation == "silu" else nn.gelu_approx(gate)) * up
    got = kernels.gated(gate_up, activation)
    assert got.shape == want.shape and got.dtype == mx.float32
    _close(got, want, 1e-5)
    _close(kernels.gated(gate_up.transpose(1, 0, 2), activation), want.transpose(1, 0, 2), 1e-5)  # not contiguous


def _reference_attention(q, keys, values, length, scale, window=None):
    """Softmax attention written out: query row i at position length - L + i sees keys up to it."""
    L, group = q.shape[2], q.shape[1] // keys.shape[1]
    k, v = (mx.repeat(a[..., :length, :].astype(mx.float32), group, axis=1) for a in (keys, values))
    rows, cols = mx.arange(length - L, length)[:, None], mx.arange(length)[None]
    seen = (cols <= rows) & ((rows - cols < window) if window else True)
    scores = mx.where(seen, (q @ k.transpose(0, 1, 3, 2)) * scale, -mx.inf)
    return mx.softmax(scores, axis=-1) @ v


@pytest.mark.parametrize("L,length", [(1, 1), (5, 5), (7, 40), (64, 300)])
@pytest.mark.parametrize("window", [None, 4, 1000])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_causal_attention_of_a_chunk_of_rows(path, L, length, window, dtype):
    mx.random.seed(L * length)
    keys, values = (mx.random.normal((2, 3, 320, 32)).astype(dtype) for _ in range(2))
    q = mx.random.normal((2, L, 6, 32)).transpose(0, 2, 1, 3)  # as the layers make it: heads not outermost
    got = kernels.attention(q, keys, values, length=length, scale=0.2, window=window)
    assert got.shape == q.shape and got.dtype == mx.float32
    _close(got, _reference_attention(q, keys, values, length, 0.2, window), 1e-5)


def test_attention_refuses_more_rows_than_positions(path):
    if path == "stock":
        pytest.skip("stock MLX's attention does not check the length")
    with pytest.raises(ValueError, match="length"):
        mx.eval(kernels.attention(mx.zeros((1, 2, 5, 8)), mx.zeros((1, 2, 16, 8)), mx.zeros((1, 2, 16, 8)),
                                  length=4, scale=1.0))


def test_a_decode_step_through_a_preallocated_cache(path):
    """rope, append and attention together, as the engine runs one layer's attention per token."""
    cache_k, cache_v = mx.zeros((1, 2, 32, 16)), mx.zeros((1, 2, 32, 16))
    ks, vs = [], []
    for pos in range(6):
        k, v, q = (mx.random.normal((1, h, 1, 16)) for h in (2, 2, 6))
        k = kernels.rope(k, dims=16, traditional=False, base=10000.0, offset=pos)
        q = kernels.rope(q, dims=16, traditional=False, base=10000.0, offset=pos)
        cache_k, cache_v = kernels.cache_append(cache_k, k, pos), kernels.cache_append(cache_v, v, pos)
        ks.append(k)
        vs.append(v)
        out = kernels.attention(q, cache_k, cache_v, length=pos + 1, scale=0.25)
        want = mx.fast.scaled_dot_product_attention(q, mx.concatenate(ks, 2), mx.concatenate(vs, 2), scale=0.25)
        _close(out, want, 1e-5)


def test_cache_append_writes_into_the_caches_own_buffer(path):
    if path == "stock":
        pytest.skip("stock MLX's slice update copies when the cache is still referenced")
    cache = mx.zeros((1, 2, 8, 4))
    mx.eval(cache)
    out = kernels.cache_append(cache, mx.ones((1, 2, 1, 4)), 3)
    mx.eval(out)
    assert out[0, 1, 3, 0].item() == 1.0
    assert cache[0, 1, 3, 0].item() == 1.0  # the old array sees the write: they are one buffer


def test_the_kernels_compile_into_one_step_with_an_array_offset(path):
    """What a fixed-shape decode step does: one mx.compile'd function, the position a scalar array."""
    w = mx.random.normal((64,))
    cache = mx.random.normal((1, 2, 16, 64))

    def step(x, pos):
        q = kernels.rope(kernels.rms_norm(x, w, 1e-5), dims=64, traditional=False, base=10000.0, offset=pos)
        return kernels.attention(q, cache, cache, length=9, scale=0.125)

    def reference(x, pos):
        q = mx.fast.rope(mx.fast.rms_norm(x, w, 1e-5), 64, traditional=False, base=10000.0, scale=1.0, offset=pos)
        return mx.fast.scaled_dot_product_attention(q, cache[..., :9, :], cache[..., :9, :], scale=0.125)

    compiled = mx.compile(step)
    x = mx.random.normal((1, 4, 1, 64))
    for pos in (3, 8):
        _close(compiled(x, mx.array(pos)), reference(x, mx.array(pos)), 1e-5)


@pytest.mark.parametrize("periods", [False, True])
def test_rope_with_an_offset_per_batch_row_rotates_each_row_as_alone(path, periods):
    """A batch of sequences, each at its own position: row b rotated from offsets[b], bit for bit as alone."""
    x = mx.random.normal((3, 4, 1, 64))
    freqs = 10000.0 ** (mx.arange(0, 64, 2) / 64) * mx.linspace(1, 4, 32) if periods else None
    offsets = [0, 41, 300]
    got = kernels.rope(x, dims=64, traditional=False, base=10000.0, offset=offsets, periods=freqs)
    for b, at in enumerate(offsets):
        alone = kernels.rope(x[b:b + 1], dims=64, traditional=False, base=10000.0, offset=at, periods=freqs)
        assert mx.array_equal(got[b:b + 1], alone).item(), b


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("window", [None, 20])
def test_a_batch_decode_step_writes_each_cache_and_attends_each_row_as_alone(path, dtype, window):
    if not kernels.decodes_batches(mx.zeros((1,), mx.float32)):
        pytest.skip("the stock path attends a batch a row at a time")
    mx.random.seed(5)
    lengths, hq, hkv, d = [7, 30, 64], 6, 2, 32
    keys = [mx.random.normal((1, hkv, 64 + 32 * b, d)).astype(dtype) for b in range(3)]
    values = [mx.random.normal((1, hkv, 64 + 32 * b, d)).astype(dtype) for b in range(3)]
    q, k, v = mx.random.normal((3, hq, 1, d)), mx.random.normal((3, hkv, 1, d)), mx.random.normal((3, hkv, 1, d))
    k, v = k.astype(dtype), v.astype(dtype)
    alone = []
    for b, at in enumerate(lengths):  # each row alone: append at its offset, attend over offset + 1 positions
        kb = kernels.cache_append(mx.array(keys[b]), k[b:b + 1], at)
        vb = kernels.cache_append(mx.array(values[b]), v[b:b + 1], at)
        alone.append((kernels.attention(q[b:b + 1], kb, vb, length=at + 1, scale=0.2, window=window), kb, vb))
    mx.eval(alone)
    out, new_keys, new_values = kernels.decode_attention(q, k, v, keys, values, lengths, scale=0.2, window=window)
    for b, (want, kb, vb) in enumerate(alone):
        assert mx.array_equal(out[b:b + 1], want).item(), b
        assert mx.array_equal(new_keys[b], kb).item() and mx.array_equal(new_values[b], vb).item(), b
