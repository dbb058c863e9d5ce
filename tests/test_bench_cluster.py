import argparse
import json
import os
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


def arguments(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cluster.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning two nodes needs two cores")
def test_one_and_two_nodes_pinned_report_speeds_agree_on_the_text_and_leave_no_process(
        models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = arguments("--nodes", "1,2", "--runs", "1", "--max-tokens", "8", "--concurrent", "2", "--pin", "--json")

    assert bench_cluster.run(args, models_dir) == 0

    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    assert [(r["nodes"], r["layers"]) for r in rows] == [(1, [[0, 30]]), (2, [[0, 15], [15, 30]])]
    for row in rows:
        assert row["completion_tokens"] == 8 and row["consistent"] and row["pinned"], row
        for key in ("ttft_s", "decode_tps", "aggregate_tps"):
            assert row[key] > 0, (row["nodes"], key)
        assert row["shared_prompt_tokens"] > 500 and min(row["shared_ttft_s"]) > 0, row
        assert row["shared_cached_tokens"] > 500, row  # the second chat computed only its question
    assert report["vs_one_node"]["2"]["same_text"]
    assert not benchmark_processes()


def test_pinning_more_nodes_than_cores_is_refused_before_any_node_starts(
        models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    too_many = len(os.sched_getaffinity(0)) + 1
    assert bench_cluster.run(arguments("--nodes", f"1,{too_many}", "--pin"), models_dir) == 2
    assert "needs a core per node" in capsys.readouterr().err
    assert not benchmark_processes()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning two nodes needs two cores")
def test_pinned_nodes_run_on_a_core_each(models_dir: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    with bench_cluster.cluster(2, models_dir, pin=True) as nodes:
        assert [psutil.Process(node.process.pid).cpu_affinity() for node in nodes] == [[cores[0]], [cores[1]]]
    assert not benchmark_processes()
