"""The multi-node runbook's check of a split, run as an operator runs it, against a real 2-node cluster.

The runbook pipes `curl .../state` into a python3 snippet written for exo's upstream shape: camelCase
keys and each instance tagged by its kind (`CpuRingInstance` for a ring on CPUs).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes import RunningNode, node_pair, untag

from exo import local_cluster
from exo.models.cards import DEFAULT_MODEL

pytestmark = pytest.mark.slow

# verbatim from the runbook; only NODE:52415 is replaced by where the test's node listens
RUNBOOK_SNIPPET = '''curl -s "http://NODE:52415/state" | python3 -c "
import json, sys
data = json.load(sys.stdin)
for id, inst in data.get('instances', {}).items():
    if 'CpuRingInstance' in inst:
        shard = inst['CpuRingInstance']['shardAssignments']
        print(f'{shard[\\"modelId\\"]}: world_size={len(shard[\\"runnerToShard\\"])}')
"
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[list[RunningNode]]:
    root = tmp_path_factory.mktemp("runbook")
    with node_pair([root / "node0", root / "node1"], models_dir, "--no-preload") as nodes:
        yield nodes


def test_the_runbooks_state_snippet_prints_the_split_across_both_nodes(cluster: list[RunningNode]) -> None:
    instance_id = local_cluster.place(cluster, cluster, DEFAULT_MODEL, [(0, 15), (15, 30)], timeout=120)
    for node in cluster:  # every node reports the same
        script = RUNBOOK_SNIPPET.replace("NODE:52415", f"{node.host}:{node.port}")
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=False)
        assert (done.returncode, done.stdout, done.stderr) == (0, f"{DEFAULT_MODEL}: world_size=2\n", "")

    [tagged] = cluster[1].state()["instances"].values()
    instance = untag(tagged)
    shards = instance["shardAssignments"]
    assert instance["instanceId"] == instance_id and shards["modelId"] == DEFAULT_MODEL
    node_ids = [n.state()["nodeId"] for n in cluster]
    assert shards["nodeToRunner"] == {node_ids[0]: f"{instance_id}.0", node_ids[1]: f"{instance_id}.1"}
    assert shards["runnerToShard"][f"{instance_id}.1"] == {"nodeId": node_ids[1], "rank": 1, "worldSize": 2,
                                                           "startLayer": 15, "endLayer": 30, "nLayers": 30}
