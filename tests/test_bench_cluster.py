import argparse
import json
from pathlib import Path

import psutil
import pytest

from exo import bench_cluster

pytestmark = pytest.mark.slow


def benchmark_processes() -> list[str]:
    """Nodes the benchmark started and their runners: their EXO_HOME is under its temp directories
    (so processes of other test runs on this host don't count)."""
    return [f"{p.pid}: {' '.join(p.info['cmdline'] or [])}" for p in psutil.process_iter(["cmdline", "environ"])
            if "exo-bench-cluster-" in (p.info["environ"] or {}).get("EXO_HOME", "")]


def test_one_and_two_nodes_report_speeds_agree_on_the_text_and_leave_no_process(
        models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench_cluster.add_arguments(parser)
    args = parser.parse_args(["--nodes", "1,2", "--runs", "1", "--max-tokens", "8", "--concurrent", "2", "--json"])

    assert bench_cluster.run(args, models_dir) == 0

    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    assert [(r["nodes"], r["layers"]) for r in rows] == [(1, [[0, 30]]), (2, [[0, 15], [15, 30]])]
    for row in rows:
        assert row["completion_tokens"] == 8 and row["consistent"], row
        for key in ("ttft_s", "decode_tps", "aggregate_tps"):
            assert row[key] > 0, (row["nodes"], key)
    assert report["vs_one_node"]["2"]["same_text"]
    assert not benchmark_processes()
