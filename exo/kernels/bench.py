"""Micro-benchmark of exo's kernels against stock MLX: `python -m exo.kernels.bench`.

Prints GB/s of weights read by quantized matmul on each path this CPU runs (and stock MLX's
mx.quantized_matmul), and µs per call of the decode-step kernels. Timings are medians of repeated
evaluations of one op, so they include MLX's per-op dispatch; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from exo import kernels


def _median_seconds(fn, repeats: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _paths() -> list[str]:
    native = kernels._native.supported_paths() if kernels._native is not None else []
    return [*native, "stock"]


def bench_quantized_matmul(repeats: int, threads: int | None) -> None:
    print("quantized matmul, GB/s of weights read (higher is better)")
    shapes = [(576, 1536), (1536, 576), (4096, 4096)]
    print(f"{'K x N':>11} {'bits':>4} {'gs':>3} {'rows':>4}  " + "  ".join(f"{p:>8}" for p in _paths()))
    for k, n in shapes:
        for bits, gs in ((4, 32), (4, 64), (8, 64)):
            w, scales, biases = mx.quantize(mx.random.normal((n, k)), group_size=gs, bits=bits)
            mx.eval(w, scales, biases)
            size = w.nbytes + scales.nbytes + biases.nbytes
            for rows in (1, 8, 128) if k * n <= 1 << 20 else (1, 8):
                x = mx.random.normal((rows, k))
                cells = []

                def op(x=x, w=w, scales=scales, biases=biases, gs=gs, bits=bits):
                    return kernels.quantized_matmul(x, w, scales, biases, group_size=gs, bits=bits)

                for path in _paths():
                    kernels.use(path, threads)
                    s = _median_seconds(op, repeats if rows < 128 or path != "stock" else max(3, repeats // 5))
                    cells.append(f"{size / s / 1e9:8.2f}")
                print(f"{k:>5}x{n:<5} {bits:>4} {gs:>3} {rows:>4}  " + "  ".join(cells))


def bench_decode_step(repeats: int, threads: int | None) -> None:
    print("\ndecode-step kernels, µs per call (lower is better); SmolLM2-135M shapes, context 256")
    x, w = mx.random.normal((1, 1, 576)), mx.random.normal((576,))
    q, k = mx.random.normal((1, 9, 1, 64)), mx.random.normal((1, 3, 1, 64))
    cache_k, cache_v = mx.random.normal((1, 3, 1024, 64)), mx.random.normal((1, 3, 1024, 64))
    mx.eval(x, w, q, k, cache_k, cache_v)
    ops = {
        "rms_norm": lambda: kernels.rms_norm(x, w, 1e-5),
        "rope (q)": lambda: kernels.rope(q, dims=64, traditional=False, base=100000.0, offset=255),
        "cache_append": lambda: kernels.cache_append(cache_k, k, 255),
        "attention": lambda: kernels.attention(q, cache_k, cache_v, length=256, scale=0.125),
    }
    print(f"{'op':>17}  " + "  ".join(f"{p:>8}" for p in _paths()))
    for name, fn in ops.items():
        cells = []
        for path in _paths():
            kernels.use(path, threads)
            cells.append(f"{_median_seconds(fn, repeats) * 1e6:8.1f}")
        print(f"{name:>17}  " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    args = parser.parse_args()
    before = kernels.info()
    print(f"exo kernels: default path {before.path} ({before.reason}), threads {args.threads or before.threads}\n")
    try:
        bench_quantized_matmul(args.repeats, args.threads)
        bench_decode_step(args.repeats, args.threads)
    finally:
        kernels.use(before.path, before.threads)


if __name__ == "__main__":
    main()
