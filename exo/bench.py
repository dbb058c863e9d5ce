"""`exo bench`: prefill and decode speed of the MLX engine, beside llama.cpp on the same GGUF file.

With `--streams N` each engine also decodes N prompts together: exo's continuous batch
(exo.engine.batch), and llama.cpp with N sequences in each decode call, as its server's N
parallel slots run them.

Every measurement runs in a child process (`python -m exo.bench --worker ...`): a BLAS can only be
preloaded before MLX is imported, and a child's peak RSS is then that engine's alone. A child
prints one JSON `Measurement` on stdout. Both engines decode greedily from the same prompt ids,
ignore end tokens and make the same number of model calls, so their ratio compares equal work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import psutil

from exo.engine.blas import PRELOADED_MARKER, find_blas, preload_env
from exo.llama_cpp_engine import open_llama_cpp
from exo.models.cards import CARDS, DEFAULT_MODEL
from exo.models.store import ModelStore
from exo.shared.types import FrozenModel

if TYPE_CHECKING:
    from exo.engine.base import LayerRange
    from exo.engine.loading import Dtype
    from exo.shared.types import CacheDtype

Engine = Literal["mlx", "llama.cpp"]

# Plain prose (63 tokens), repeated and cut to the requested length: the words don't change the speed.
_PROMPT = ("The history of computing is a story of machines that became smaller, cheaper and faster, "
           "and of people who found new uses for them at every step. Early computers filled rooms, "
           "drew kilowatts and were programmed by rewiring panels; today a phone holds more memory "
           "than every machine of the nineteen sixties together. ")


class Measurement(FrozenModel):
    """Medians over the timed runs of one engine in one configuration."""

    engine: Engine
    config: str
    prompt_tokens: int
    decode_tokens: int
    runs: int
    prompt_tps: float
    decode_tps: float
    ttft_s: float
    peak_rss_mb: float  # the whole child's peak, model loading included
    rss_mb: float  # after the runs: what serving the model keeps resident
    mlx_peak_mb: float | None = None
    model_file_mb: float = 0.0
    kernels: str | None = None  # MLX only: exo.kernels' code path and why it was chosen
    prompt: list[int] = []  # the prompt's ids, so llama.cpp reads exactly the ones MLX read
    tokens: list[int] = []  # the last run's greedy continuation, to check that the engines agree
    streams: int = 1
    batch_decode_tps: float | None = None  # with streams > 1: all their tokens over the decode's wall time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(CARDS), help="model id")
    parser.add_argument("--runs", type=int, default=5, help="timed runs, after one untimed warm-up run")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate; end tokens are ignored")
    parser.add_argument("--dtype", default="quantized", choices=["quantized", "float32", "float16", "bfloat16"],
                        help="how MLX holds the weights (default: quantized, as stored in the file)")
    parser.add_argument("--kv-cache", default="float32", choices=["float32", "float16"],
                        help="dtype of MLX's key/value cache (default: float32)")
    parser.add_argument("--blas", default="auto", choices=["auto", "blis", "openblas", "bundled"])
    parser.add_argument("--streams", type=int, default=1,
                        help="also decode this many prompts together (1 to 8) and report the aggregate rate")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace, models_dir: Path) -> int:
    if args.runs < 1 or args.max_tokens < 2 or args.prompt_tokens < 1 or not 1 <= args.streams <= 8:
        print("exo bench: needs --runs >= 1, --max-tokens >= 2, --prompt-tokens >= 1 and --streams in [1, 8]",
              file=sys.stderr)
        return 2
    library = find_blas(args.blas)
    if library is None and args.blas in ("blis", "openblas"):
        print(f"exo bench: no loadable {args.blas} library; install it or pass --blas bundled", file=sys.stderr)
        return 2
    path = ModelStore(models_dir).ensure(CARDS[args.model])
    env = _env_without_exo_blas()
    config = f"{args.dtype}, {Path(library).name if library else 'bundled BLAS'}"
    if args.kv_cache != "float32":
        config += f", {args.kv_cache} cache"
    common = [str(path), str(args.runs), str(args.max_tokens), str(args.streams)]
    try:
        mlx = _spawn(["mlx", *common, args.dtype, args.kv_cache, str(args.prompt_tokens), config],
                     preload_env(library, env) if library else env)
        cpp = None
        if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
            cpp = _spawn(["llama.cpp", *common, ",".join(map(str, mlx.prompt))], env)
    except RuntimeError as e:
        print(f"exo bench: {e}", file=sys.stderr)
        return 1
    ratio = _compare(mlx, cpp) if cpp else None
    if args.json:
        hidden = {"prompt", "tokens"}
        print(json.dumps({"mlx": mlx.model_dump(exclude=hidden, by_alias=False),
                          "llama_cpp": cpp.model_dump(exclude=hidden, by_alias=False) if cpp else None,
                          "mlx_over_llama_cpp": ratio}, indent=2))
    else:
        print(_table([mlx, *([cpp] if cpp else [])], ratio))
    return 0


def _env_without_exo_blas() -> dict[str, str]:
    """This environment minus a BLAS that `exo` preloaded into itself, so each child gets only its own."""
    env = dict(os.environ)
    if library := env.pop(PRELOADED_MARKER, None):
        env["LD_PRELOAD"] = " ".join(p for p in env.get("LD_PRELOAD", "").split() if p != library)
    return env


def _spawn(worker_args: list[str], env: dict[str, str]) -> Measurement:
    cmd = [sys.executable, "-m", "exo.bench", "--worker", *worker_args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        why = done.stderr.strip() or (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
                                      else f"exit status {done.returncode}")
        raise RuntimeError(f"the {worker_args[0]} measurement failed:\n{why}")
    return Measurement.model_validate_json(done.stdout.strip().splitlines()[-1])


def _compare(mlx: Measurement, cpp: Measurement) -> dict[str, float]:
    agree = next((i for i, (a, b) in enumerate(zip(mlx.tokens, cpp.tokens, strict=False)) if a != b), len(mlx.tokens))
    ratio = {"prompt_tps": mlx.prompt_tps / cpp.prompt_tps, "decode_tps": mlx.decode_tps / cpp.decode_tps,
             "ttft_s": mlx.ttft_s / cpp.ttft_s, "greedy_tokens_agreeing": agree}
    if mlx.batch_decode_tps and cpp.batch_decode_tps:
        ratio["batch_decode_tps"] = mlx.batch_decode_tps / cpp.batch_decode_tps
    return ratio


def _table(results: list[Measurement], ratio: dict[str, float] | None) -> str:
    rows = [("engine", "config", "prompt tok/s", "decode tok/s", "TTFT ms", "peak RSS MB", "RSS MB", "RSS / file")]
    for r in results:
        rows.append((r.engine, r.config, f"{r.prompt_tps:.1f}", f"{r.decode_tps:.1f}", f"{r.ttft_s * 1e3:.0f}",
                     f"{r.peak_rss_mb:.0f}", f"{r.rss_mb:.0f}", f"{r.rss_mb / r.model_file_mb:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    first = results[0]
    lines.append(f"{first.prompt_tokens} prompt tokens, {first.decode_tokens} generated, "
                 f"median of {first.runs} runs after a warm-up; model file {first.model_file_mb:.0f} MB")
    lines += [f"MLX kernels: {r.kernels}" for r in results if r.kernels]
    lines += [f"{r.engine}: {r.streams} streams decoding together {r.batch_decode_tps:.1f} tok/s, "
              f"{r.batch_decode_tps / r.decode_tps:.2f}x one stream" for r in results if r.batch_decode_tps]
    if ratio:
        lines.append(f"MLX / llama.cpp: prefill {ratio['prompt_tps']:.2f}x, decode {ratio['decode_tps']:.2f}x"
                     + (f", {first.streams} streams {ratio['batch_decode_tps']:.2f}x" if "batch_decode_tps" in ratio
                        else "")
                     + f"; greedy outputs agree for the first {ratio['greedy_tokens_agreeing']:.0f} tokens")
    return "\n".join(lines)


def _time_runs(generate: Callable[[], Iterator[int]], runs: int, max_tokens: int,
               settle: Callable[[], None]) -> tuple[list[tuple[float, float]], list[int]]:
    """(time to the first token, time for the other tokens) of each run after the warm-up one."""
    timings, tokens = [], []
    for _ in range(runs + 1):
        start = time.perf_counter()
        stream = generate()
        tokens = [next(stream)]
        first = time.perf_counter()
        tokens += [next(stream) for _ in range(max_tokens - 1)]
        timings.append((first - start, time.perf_counter() - first))
        stream.close()
        settle()  # a step queued ahead must finish outside the next run's clock
    return timings[1:], tokens


def _summarize(engine: Engine, config: str, n_prompt: int, max_tokens: int, timings: list[tuple[float, float]],
               tokens: list[int], mlx_peak_mb: float | None) -> Measurement:
    ttft = statistics.median(t for t, _ in timings)
    decode = statistics.median(d for _, d in timings)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return Measurement(engine=engine, config=config, prompt_tokens=n_prompt, decode_tokens=max_tokens,
                       runs=len(timings), prompt_tps=n_prompt / ttft, decode_tps=(max_tokens - 1) / decode,
                       ttft_s=ttft, peak_rss_mb=peak / 1e6, rss_mb=psutil.Process().memory_info().rss / 1e6,
                       mlx_peak_mb=mlx_peak_mb, tokens=tokens)


def _with_file(m: Measurement, path: Path) -> Measurement:
    return m.model_copy(update={"model_file_mb": path.stat().st_size / 1e6})


def _context(n_prompt: int, max_tokens: int) -> int:
    """The context both engines serve a run in (so a longrope model takes the same factors in each)."""
    return n_prompt + max_tokens + 8


def _prompts(first: list[int], streams: int) -> list[list[int]]:
    """`streams` prompts as long as `first`, each a rotation of it, so no two share a prefix."""
    step = max(1, len(first) // streams)
    return [first[i * step:] + first[:i * step] for i in range(streams)]


def _measure_mlx(path: Path, runs: int, max_tokens: int, streams: int, dtype: str, kv_cache: str, n_prompt: int,
                 config: str) -> Measurement:
    import mlx.core as mx  # imported here only: the parent must not load MLX before a child preloads a BLAS

    from exo import kernels
    from exo.engine.generate import generate_step
    from exo.engine.loading import load

    loaded = load(path, dtype=cast("Dtype", dtype), kv_cache=cast("CacheDtype", kv_cache),
                  context=_context(n_prompt, max_tokens))
    model = loaded.model
    prompt = loaded.tokenizer.encode(_PROMPT * (n_prompt // 60 + 1))[:n_prompt]
    mx.reset_peak_memory()
    timings, tokens = _time_runs(lambda: generate_step(prompt, model, model.make_cache()), runs, max_tokens,
                                 mx.synchronize)
    m = _summarize("mlx", config, len(prompt), max_tokens, timings, tokens, mx.get_peak_memory() / 1e6 or None)
    chosen = kernels.info()
    batched = _batched_mlx(model, _prompts(prompt, streams), max_tokens) if streams > 1 else None
    return m.model_copy(update={"prompt": prompt, "kernels": f"{chosen.path} ({chosen.reason}; {chosen.threads} "
                                f"thread{'s' if chosen.threads != 1 else ''})", "streams": streams,
                                "batch_decode_tps": batched})


def _batched_mlx(model: LayerRange, prompts: list[list[int]], max_tokens: int) -> float:
    """Tokens per second of `prompts` decoded together in one batch, from when each has its first token."""
    import mlx.core as mx

    from exo.engine.batch import Batch
    from exo.shared.generation import GenerationParams

    batch = Batch(model, len(prompts) * _context(len(prompts[0]), max_tokens), max_size=len(prompts))
    for i, prompt in enumerate(prompts):
        batch.join(str(i), prompt, GenerationParams(max_tokens=max_tokens))
    got = dict.fromkeys(map(str, range(len(prompts))), 0)

    def step() -> int:
        done = batch.step().tokens
        for key in done:
            got[key] += 1
            if got[key] == max_tokens:
                batch.leave(key)
        return len(done)

    while not all(got.values()):
        step()
    mx.synchronize()
    start, n = time.perf_counter(), 0
    while len(batch):
        n += step()
    return n / (time.perf_counter() - start)


def _measure_llama_cpp(path: Path, runs: int, max_tokens: int, streams: int, prompt: list[int]) -> Measurement:
    threads = os.cpu_count() or 1
    with open_llama_cpp(path, n_ctx=_context(len(prompt), max_tokens), n_batch=512, n_threads=threads,
                        n_threads_batch=threads) as llm:

        def generate() -> Iterator[int]:
            llm.reset()  # otherwise llama-cpp-python reuses the previous run's prompt from its cache
            return llm.generate(prompt, top_k=1, temp=0.0, reset=False)

        timings, tokens = _time_runs(generate, runs, max_tokens, lambda: None)
        batched = _batched_llama_cpp(llm, _prompts(prompt, streams), max_tokens, threads) if streams > 1 else None
    m = _summarize("llama.cpp", f"GGUF as stored, {threads} threads", len(prompt), max_tokens, timings, tokens, None)
    return m.model_copy(update={"streams": streams, "batch_decode_tps": batched})


def _batched_llama_cpp(llm: Any, prompts: list[list[int]], max_tokens: int, threads: int) -> float:
    """Tokens per second of `prompts` decoded greedily by llama.cpp, one sequence each, all of them in every
    decode call (a context of its own with a sequence per prompt, as llama.cpp's server gives its slots)."""
    import numpy as np
    from llama_cpp import llama_cpp as native

    params = native.llama_context_default_params()
    params.n_ctx = len(prompts) * _context(len(prompts[0]), max_tokens)
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = threads
    params.n_seq_max = len(prompts)
    params.kv_unified = True  # one cache for all the sequences, as the server's slots share theirs
    model = llm._model.model
    ctx = native.llama_init_from_model(model, params)
    batch = native.llama_batch_init(512, 0, 1)
    n_vocab = native.llama_vocab_n_tokens(native.llama_model_get_vocab(model))

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, logits?)
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        if native.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(native.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))

    try:
        following = []
        for seq, prompt in enumerate(prompts):
            for at in range(0, len(prompt), 512):
                chunk = prompt[at:at + 512]
                decode([(t, at + i, seq, at + i == len(prompt) - 1) for i, t in enumerate(chunk)])
            following.append(greedy(len(chunk) - 1))
        start = time.perf_counter()
        for step in range(max_tokens - 1):
            decode([(t, len(p) + step, seq, True) for seq, (t, p) in enumerate(zip(following, prompts, strict=True))])
            following = [greedy(i) for i in range(len(prompts))]
        return len(prompts) * (max_tokens - 1) / (time.perf_counter() - start)
    finally:
        native.llama_batch_free(batch)
        native.llama_free(ctx)


def _worker(argv: list[str]) -> Measurement:
    engine, path, runs, max_tokens, streams, *rest = argv
    if engine == "mlx":
        dtype, kv_cache, n_prompt, config = rest
        return _with_file(_measure_mlx(Path(path), int(runs), int(max_tokens), int(streams), dtype, kv_cache,
                                       int(n_prompt), config), Path(path))
    (ids,) = rest
    return _with_file(_measure_llama_cpp(Path(path), int(runs), int(max_tokens), int(streams),
                                         [int(i) for i in ids.split(",")]), Path(path))


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        sys.exit("usage: python -m exo.bench --worker ENGINE ...  (this is `exo bench`'s child; run that instead)")
    print(_worker(sys.argv[2:]).model_dump_json())
