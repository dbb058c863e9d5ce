"""How the state serializes: camelCase out, either spelling in, and each instance tagged by its kind with
its shard assignments, as exo's upstream shows /state. The wire and the OpenAI models keep field names."""

from __future__ import annotations

import msgpack
import pytest

from exo.api.openai.protocol import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage
from exo.net.messages import CODEC, Snapshot
from exo.shared.state import Instance, InstanceKind, NodeProfile, ShardAssignment, State
from exo.shared.types import InstanceId, NodeId


def profile(node_id: str, mlx_device: str = "Device(cpu, 0)") -> NodeProfile:
    return NodeProfile(node_id=NodeId(node_id), hostname=node_id, version="0.1.0", address="10.0.0.1",
                       api_port=52415, memory_total=16 << 30, memory_available=8 << 30, cpu_count=8,
                       accelerator="cpu", mlx_device=mlx_device)


SPLIT = Instance(instance_id=InstanceId("i1"), model_id="tiny", n_layers=4,
                 shards=(ShardAssignment(node_id=NodeId("a"), rank=0, start=0, end=3),
                         ShardAssignment(node_id=NodeId("b"), rank=1, start=3, end=4)), context=2048)


def test_an_instance_is_tagged_by_its_kind_with_the_shard_of_each_runner() -> None:
    assert SPLIT.model_dump(mode="json") == {"CpuRingInstance": {
        "instanceId": "i1", "modelId": "tiny", "nLayers": 4,
        "shards": [{"nodeId": "a", "rank": 0, "start": 0, "end": 3}, {"nodeId": "b", "rank": 1, "start": 3, "end": 4}],
        "context": 2048,
        "shardAssignments": {
            "modelId": "tiny",
            "runnerToShard": {
                "i1.0": {"nodeId": "a", "rank": 0, "worldSize": 2, "startLayer": 0, "endLayer": 3, "nLayers": 4},
                "i1.1": {"nodeId": "b", "rank": 1, "worldSize": 2, "startLayer": 3, "endLayer": 4, "nLayers": 4}},
            "nodeToRunner": {"a": "i1.0", "b": "i1.1"}}}}


@pytest.mark.parametrize("dump", [
    lambda i: i.model_dump(mode="json"),                 # as /state shows it
    lambda i: i.model_dump(mode="json", by_alias=False),  # as the wire carries it
    lambda i: {"instance_id": "i1", "model_id": "tiny", "n_layers": 4,  # untagged, in field names
               "shards": [s.model_dump(by_alias=False) for s in i.shards], "context": 2048},
], ids=["camel-tagged", "snake-tagged", "untagged"])
def test_an_instance_reads_back_from_each_spelling(dump: object) -> None:
    assert Instance.model_validate(dump(SPLIT)) == SPLIT  # type: ignore[operator]


def test_the_state_dumps_camel_case_and_the_wire_keeps_field_names() -> None:
    state = State(term=2, master_id=NodeId("a"), nodes={NodeId("a"): profile("a")},
                  instances={SPLIT.instance_id: SPLIT})
    shown = state.model_dump(mode="json")
    assert {"lastEventIndex", "masterId"} <= set(shown) and shown["nodes"]["a"]["apiPort"] == 52415
    snapshot = Snapshot(term=2, master_id=NodeId("a"), state=state)
    raw = msgpack.unpackb(CODEC.encode(snapshot))
    assert raw["d"]["master_id"] == "a" and "api_port" in raw["d"]["state"]["nodes"]["a"]
    assert "CpuRingInstance" in raw["d"]["state"]["instances"]["i1"]
    assert CODEC.decode(CODEC.encode(snapshot)) == snapshot


@pytest.mark.parametrize(("devices", "kind"), [
    (["Device(cpu, 0)", "Device(cpu, 0)"], InstanceKind.CPU_RING),
    (["Device(gpu, 0)", "Device(cpu, 0)"], InstanceKind.CPU_RING),  # a ring runs at its slowest node's pace
    (["Device(gpu, 0)", "Device(gpu, 0)"], InstanceKind.MLX_RING),
    ([], InstanceKind.CPU_RING),
])
def test_a_ring_is_an_mlx_ring_only_where_every_node_runs_mlx_on_a_gpu(devices: list[str], kind: InstanceKind) -> None:
    assert InstanceKind.of(profile(str(i), d) for i, d in enumerate(devices)) is kind


def test_the_openai_models_keep_openais_snake_case() -> None:
    completion = ChatCompletion(id="c", created=0, model="m", usage=Usage(prompt_tokens=1, completion_tokens=2,
                                                                        total_tokens=3),
                                choices=[Choice(message=AssistantMessage(content="hi"), finish_reason="stop")])
    dumped = completion.model_dump(mode="json")
    assert dumped["choices"][0]["finish_reason"] == "stop" and dumped["usage"]["prompt_tokens"] == 1
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": 3}).token_limit == 3
