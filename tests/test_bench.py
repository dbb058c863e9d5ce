import argparse
import json
from pathlib import Path

import pytest

from exo import bench, kernels
from exo.models.cards import CARDS, DEFAULT_MODEL
from exo.models.store import ModelStore


def test_bench_reports_positive_speeds_for_the_real_model(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--runs", "1", "--max-tokens", "4", "--prompt-tokens", "16", "--no-llama-cpp", "--json"])

    assert bench.run(args, models_dir) == 0

    report = json.loads(capsys.readouterr().out)
    mlx = report["mlx"]
    assert (mlx["prompt_tokens"], mlx["decode_tokens"], mlx["runs"]) == (16, 4, 1)
    for key in ("prompt_tps", "decode_tps", "ttft_s", "peak_rss_mb", "rss_mb"):
        assert mlx[key] > 0, key
    assert report["llama_cpp"] is None
    assert mlx["config"].startswith("quantized")  # weights as stored, by default
    assert mlx["model_file_mb"] == pytest.approx(model_file_mb(models_dir))
    assert mlx["kernels"].startswith(kernels.info().path)


def model_file_mb(models_dir: Path) -> float:
    return ModelStore(models_dir).path(CARDS[DEFAULT_MODEL]).stat().st_size / 1e6


def test_bench_decodes_streams_together_in_both_engines(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--runs", "1", "--max-tokens", "6", "--prompt-tokens", "24", "--streams", "3", "--json"])

    assert bench.run(args, models_dir) == 0

    report = json.loads(capsys.readouterr().out)
    for engine in ("mlx", "llama_cpp"):
        assert report[engine]["streams"] == 3 and report[engine]["batch_decode_tps"] > 0, engine
    assert report["mlx_over_llama_cpp"]["batch_decode_tps"] > 0


def test_bench_refuses_more_streams_than_a_batch_holds(models_dir: Path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--streams", "9"]), models_dir) == 2
