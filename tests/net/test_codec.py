"""The wire codec: every message survives a round trip with its exact type, and no malformed frame
gets past `decode` as anything but `WireError`."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from exo.net.codec import WIRE_VERSION, Codec, WireError
from exo.net.messages import CODEC, EventBatch, Heartbeat, Snapshot
from exo.shared.events import (
    EVENT_TYPES,
    BaseEvent,
    InstanceCreated,
    InstanceDeleted,
    MasterElected,
    NodeJoined,
    NodeLeft,
    NodeProfileUpdated,
    RunnerRemoved,
    RunnerUpdated,
    TaskUpdated,
)
from exo.shared.runners import Download, RunnerInfo, RunnerStatus, TaskInfo, TaskKind, TaskStatus
from exo.shared.state import Instance, NodeProfile, ShardAssignment, SharedModel, State
from exo.shared.types import FrozenModel, InstanceId, NodeId


def profile(node_id: str, **changes: Any) -> NodeProfile:
    fields: dict[str, Any] = {
        "node_id": NodeId(node_id), "hostname": f"{node_id}.local", "version": "0.1.0", "address": "192.168.1.7",
        "api_port": 52415, "memory_total": 64 << 30, "memory_available": 48 << 30, "cpu_count": 12,
        "accelerator": "gpu", "mlx_device": "gpu"}
    return NodeProfile(**{**fields, **changes})


INSTANCE = Instance(instance_id=InstanceId("3f2a9c01bd7e"), model_id="mlx-community/SmolLM2-135M-Instruct",
                    n_layers=30, shards=(ShardAssignment(node_id=NodeId("a"), rank=0, start=0, end=18),
                                         ShardAssignment(node_id=NodeId("b"), rank=1, start=18, end=30)))

OWN_MODEL = SharedModel(model_id="my-finetune.Q4_K_M", version="56b11b5adcccb673", bytes=96_576_768,
                        n_params=134_515_008, n_layers=30, kv_width=384, context_length=8192)
RUNNER = RunnerInfo(instance_id=INSTANCE.instance_id, rank=1, node_id=NodeId("b"), status=RunnerStatus.READY,
                    start=18, end=30, host="192.168.1.8", port=53117, pid=4242,
                    download=Download(from_node=NodeId("a"), bytes_done=1 << 20, bytes_total=52 << 20))
TASK = TaskInfo(task_id="t-1", instance_id=INSTANCE.instance_id, rank=0, kind=TaskKind.LOAD,
                status=TaskStatus.FAILED, error="a Load task cannot run while the runner is Ready")

EVENTS: list[BaseEvent] = [
    MasterElected(index=0, term=3, node_id=NodeId("a")),
    NodeJoined(index=1, term=3, profile=profile("a", memory_cap=32 << 30)),
    NodeProfileUpdated(index=2, term=3, profile=profile("a", memory_available=1 << 30, models=(OWN_MODEL,))),
    NodeLeft(index=3, term=3, node_id=NodeId("c")),
    InstanceCreated(index=4, term=3, instance=INSTANCE),
    InstanceDeleted(index=5, term=3, instance_id=InstanceId("0123456789ab")),
    RunnerUpdated(index=6, term=3, runner=RUNNER),
    RunnerRemoved(index=7, term=3, runner_id=RUNNER.runner_id),
    TaskUpdated(index=8, term=3, task=TASK),
]
assert {type(e) for e in EVENTS} == set(EVENT_TYPES)  # one of each, so a new event type needs a case here

STATE = State(last_event_index=41, term=3, master_id=NodeId("a"),
              nodes={NodeId("a"): profile("a", memory_cap=32 << 30),
                     NodeId("b"): profile("b", hostname="bé-ünicode")},
              instances={INSTANCE.instance_id: INSTANCE}, runners={RUNNER.runner_id: RUNNER},
              tasks={TASK.task_id: TASK})

MESSAGES: list[FrozenModel] = [
    Heartbeat(cluster="home", version="0.1.0", profile=profile("a"), term=3, master_id=NodeId("a"), synced_term=3,
              last_event_index=41),
    Heartbeat(cluster="home", version="0.1.0", profile=profile("b"), term=3, master_id=NodeId("a"), synced_term=3,
              last_event_index=41, runners=(RUNNER,), tasks=(TASK,)),
    Heartbeat(cluster="home", version="0.1.0", profile=profile("b"), term=0, master_id=None, synced_term=-1,
              last_event_index=-1),
    EventBatch(term=3, master_id=NodeId("a"), events=EVENTS),
    EventBatch(term=3, master_id=NodeId("a"), events=[]),
    Snapshot(term=3, master_id=NodeId("a"), state=STATE),
    Snapshot(term=0, master_id=NodeId("a"), state=State()),
    *EVENTS,
]


def frame(**envelope: Any) -> bytes:
    return msgpack.packb({"v": WIRE_VERSION, **envelope})


def decodes_or_refuses(data: bytes) -> None:
    try:
        assert isinstance(CODEC.decode(data), FrozenModel)
    except WireError:
        pass


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_a_round_trip_with_its_type(message: FrozenModel) -> None:
    decoded = CODEC.decode(CODEC.encode(message))
    assert type(decoded) is type(message) and decoded == message


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_an_event_batch_keeps_each_events_type(event: BaseEvent) -> None:
    decoded = CODEC.decode(CODEC.encode(EventBatch(term=3, master_id=NodeId("a"), events=[event])))
    assert isinstance(decoded, EventBatch) and type(decoded.events[0]) is type(event) and decoded.events == [event]


def test_events_of_one_shape_are_told_apart() -> None:
    # NodeLeft and MasterElected carry the same fields; so do NodeJoined and NodeProfileUpdated.
    events = [NodeLeft(index=0, term=1, node_id=NodeId("a")), MasterElected(index=1, term=1, node_id=NodeId("a")),
              NodeProfileUpdated(index=2, term=1, profile=profile("a")),
              NodeJoined(index=3, term=1, profile=profile("a"))]
    decoded = CODEC.decode(CODEC.encode(EventBatch(term=1, master_id=NodeId("a"), events=events)))
    assert isinstance(decoded, EventBatch)
    assert [type(e) for e in decoded.events] == [NodeLeft, MasterElected, NodeProfileUpdated, NodeJoined]


def test_a_frame_is_a_versioned_tagged_map() -> None:
    raw = msgpack.unpackb(CODEC.encode(MESSAGES[0]))
    assert raw["v"] == WIRE_VERSION and raw["t"] == "Heartbeat" and raw["d"]["profile"]["node_id"] == "a"


def test_an_unregistered_type_is_not_sent() -> None:
    with pytest.raises(TypeError, match="State"):
        CODEC.encode(STATE)
    with pytest.raises(TypeError):
        Codec(Heartbeat).encode(Snapshot(term=0, master_id=NodeId("a"), state=State()))


# -- malformed frames ---------------------------------------------------------------------------

GOOD_FRAMES = [CODEC.encode(m) for m in MESSAGES]
HEARTBEAT_BODY = MESSAGES[0].model_dump(mode="json")


@pytest.mark.parametrize("data", GOOD_FRAMES, ids=lambda d: msgpack.unpackb(d)["t"])
def test_every_truncated_frame_is_refused(data: bytes) -> None:
    for end in range(len(data)):
        with pytest.raises(WireError):
            CODEC.decode(data[:end])


def test_trailing_bytes_after_a_frame_are_refused() -> None:
    with pytest.raises(WireError):
        CODEC.decode(GOOD_FRAMES[0] + b"\x00")
    with pytest.raises(WireError):
        CODEC.decode(GOOD_FRAMES[0] * 2)


def test_random_bytes_are_refused() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        data = rng.randbytes(rng.randint(0, 80))
        with pytest.raises(WireError):
            CODEC.decode(data)


def test_corrupted_frames_decode_or_are_refused_with_wire_error_only() -> None:
    rng = random.Random(99)
    for _ in range(3000):
        data = bytearray(rng.choice(GOOD_FRAMES))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            match rng.randrange(3):
                case 0:
                    data[at] = rng.randrange(256)
                case 1:
                    del data[at]
                case _:
                    data.insert(at, rng.randrange(256))
        decodes_or_refuses(bytes(data))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "str", "none", "bool", "float", "bytes"] + (["list", "map"] if depth < 4 else [])
    match rng.choice(kinds):
        case "int":
            return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 - 1, rng.randint(-1000, 1000)])
        case "str":
            return rng.choice(["", "a", "Heartbeat", "NodeLeft", "type", "node_id", "é", "x" * 300])
        case "none":
            return None
        case "bool":
            return rng.random() < 0.5
        case "float":
            return rng.choice([0.5, float("nan"), float("inf"), -1e308])
        case "bytes":
            return rng.randbytes(rng.randint(0, 8))
        case "list":
            return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
        case _:
            return {rng.choice(["index", "term", "node_id", "events", "state", "type", "profile", "x"]):
                    random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def mutated(value: Any, rng: random.Random) -> Any:
    """`value` with one thing somewhere inside it replaced, removed or added."""
    if isinstance(value, (dict, list)) and value and rng.random() < 0.8:
        copy = dict(value) if isinstance(value, dict) else list(value)
        at = rng.choice(list(copy)) if isinstance(copy, dict) else rng.randrange(len(copy))
        match rng.randrange(4):
            case 0:
                del copy[at]
            case 1 if isinstance(copy, dict):
                copy[rng.choice(["type", "extra", "index"])] = random_value(rng)
            case _:
                copy[at] = mutated(copy[at], rng)
        return copy
    return random_value(rng)


def test_random_and_mutated_bodies_under_every_tag_decode_or_are_refused_with_wire_error_only() -> None:
    rng = random.Random(7)
    tags = [*CODEC.types, "Nope"]
    for _ in range(4000):
        if rng.random() < 0.3:
            decodes_or_refuses(frame(t=rng.choice(tags), d=random_value(rng)))
        else:  # near misses: a real frame with one thing deep inside it changed
            real = msgpack.unpackb(rng.choice(GOOD_FRAMES))
            tag = real["t"] if rng.random() < 0.9 else rng.choice(tags)
            decodes_or_refuses(frame(t=tag, d=mutated(real["d"], rng)))


@pytest.mark.parametrize("version", [0, 2, -1, "1", None, [1], 1.5])
def test_another_wire_version_is_refused(version: Any) -> None:
    with pytest.raises(WireError, match="wire version"):
        CODEC.decode(msgpack.packb({"v": version, "t": "Heartbeat", "d": HEARTBEAT_BODY}))


@pytest.mark.parametrize("tag", ["Nope", "", "heartbeat", "State", "NodeProfile", "BaseEvent", "FrozenModel"])
def test_an_unknown_type_tag_is_refused(tag: str) -> None:
    with pytest.raises(WireError, match="unknown message type"):
        CODEC.decode(frame(t=tag, d=HEARTBEAT_BODY))


@pytest.mark.parametrize("tag", [1, None, True, 1.5, b"Heartbeat", ["Heartbeat"], {"x": "Heartbeat"}])
def test_a_tag_that_is_not_a_string_is_refused(tag: Any) -> None:
    with pytest.raises(WireError, match="unknown message type"):
        CODEC.decode(frame(t=tag, d=HEARTBEAT_BODY))


@pytest.mark.parametrize("top", [[1, "Heartbeat", {}], 1, "Heartbeat", None, b"\x01", 1.0, True])
def test_a_top_level_that_is_not_a_map_is_refused(top: Any) -> None:
    with pytest.raises(WireError, match="a frame is a map"):
        CODEC.decode(msgpack.packb(top))


@pytest.mark.parametrize("envelope", [
    {"v": 1, "t": "Heartbeat"},
    {"v": 1, "d": {}},
    {"t": "Heartbeat", "d": {}},
    {"v": 1, "t": "Heartbeat", "d": {}, "x": 0},
    {},
], ids=["no body", "no tag", "no version", "extra key", "empty"])
def test_a_map_without_exactly_v_t_and_d_is_refused(envelope: dict[str, Any]) -> None:
    with pytest.raises(WireError, match="a frame is a map"):
        CODEC.decode(msgpack.packb(envelope))


def test_map_keys_that_are_not_strings_are_refused() -> None:
    with pytest.raises(WireError, match="not a msgpack frame"):
        CODEC.decode(msgpack.packb({1: 1, "t": "Heartbeat", "d": {}}))
    with pytest.raises(WireError):
        CODEC.decode(frame(t="Heartbeat", d={**HEARTBEAT_BODY, 7: 1}))


@pytest.mark.parametrize("body", [
    {k: v for k, v in HEARTBEAT_BODY.items() if k != "term"},
    {**HEARTBEAT_BODY, "term": "three"},
    {**HEARTBEAT_BODY, "spare": 1},
    {**HEARTBEAT_BODY, "profile": {"node_id": "a"}},
    [HEARTBEAT_BODY],
    None,
    "Heartbeat",
    7,
], ids=["missing field", "wrong field type", "unknown field", "invalid nested model", "list", "nil", "str", "int"])
def test_a_valid_envelope_with_an_invalid_body_is_refused(body: Any) -> None:
    with pytest.raises(WireError, match="invalid Heartbeat"):
        CODEC.decode(frame(t="Heartbeat", d=body))


@pytest.mark.parametrize("events", [
    [{"index": 0, "term": 1, "node_id": "a"}],
    [{"type": "Nope", "index": 0, "term": 1, "node_id": "a"}],
    [{"type": ["NodeLeft"], "index": 0, "term": 1, "node_id": "a"}],
    [{"type": "NodeLeft", "index": 0, "term": 1}],
    [{"type": "NodeLeft", "index": 0, "term": 1, "node_id": "a", "profile": None}],
    [3],
    {"type": "NodeLeft"},
], ids=["untagged event", "unknown event", "non-string event tag", "missing field", "extra field", "not a map",
        "not a list"])
def test_an_event_batch_with_an_invalid_event_is_refused(events: Any) -> None:
    with pytest.raises(WireError, match="invalid EventBatch"):
        CODEC.decode(frame(t="EventBatch", d={"term": 1, "master_id": "a", "events": events}))


def test_a_snapshot_with_an_invalid_state_is_refused() -> None:
    state = STATE.model_dump(mode="json")
    state["nodes"]["a"]["api_port"] = "http"
    with pytest.raises(WireError, match="invalid Snapshot"):
        CODEC.decode(frame(t="Snapshot", d={"term": 3, "master_id": "a", "state": state}))


def test_invalid_utf8_and_deep_nesting_are_refused() -> None:
    with pytest.raises(WireError):
        CODEC.decode(b"\x83\xa1v\x01\xa1t\xa2\xff\xfe\xa1d\x80")  # a tag that is not UTF-8
    with pytest.raises(WireError):
        CODEC.decode(b"\xdd\x00\x00\x00\x01" * 5000)  # arrays nested past msgpack's limit
    with pytest.raises(WireError):
        CODEC.decode(b"\xdd\xff\xff\xff\xff")  # an array that claims 4 billion items
