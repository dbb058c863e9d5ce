import argparse
import json
from pathlib import Path

import pytest

from exo import bench


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
