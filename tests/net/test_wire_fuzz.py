"""Property-based fuzzing of the wire: whatever bytes a peer or a runner sends, decoding gives a message
of a registered type or `WireError`, and nothing a peer can send takes a node down.

tests/net/test_codec.py holds the hand-picked malformed frames and seeded random corruptions; here
hypothesis searches (and shrinks) arbitrary bytes, random msgpack, valid envelopes around random or
other types' bodies, and mutations of real messages, for both codecs, the runner pipe's frame reader,
a coordinator fed whatever decodes, and a live node's POST /cluster/message.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from nodes import RunningNode

from exo import __version__
from exo.master.coordinator import Coordinator
from exo.net.codec import WIRE_VERSION, Codec, WireError
from exo.net.messages import CODEC, Heartbeat
from exo.net.transport import MAX_FRAME_BYTES, MESSAGE_PATH, PeerTransport
from exo.shared.state import NodeProfile
from exo.shared.types import WIRE_INT_MAX, FrozenModel, NodeId
from exo.worker.runner.messages import HEADER_SIZE, PIPE_CODEC, pack_frame, read_frame

# Hypothesis caches what it learns (unicode tables, constants of the code under test) in ./.hypothesis as
# soon as a strategy is built, database or not: in a temporary directory instead, removed at exit.
if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = tempfile.mkdtemp(prefix="exo-hypothesis-")
    atexit.register(shutil.rmtree, os.environ["HYPOTHESIS_STORAGE_DIRECTORY"], ignore_errors=True)
set_hypothesis_home_dir(os.environ["HYPOTHESIS_STORAGE_DIRECTORY"])

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
CODECS = [pytest.param(CODEC, id="cluster"), pytest.param(PIPE_CODEC, id="runner-pipe")]
INT64 = (-(2**63), 2**64 - 1)  # what msgpack can carry: int64 and uint64


def decoded_or_refused(codec: Codec, data: bytes) -> FrozenModel | None:
    """The message `data` decodes to, or None where the codec refused it; anything else fails the test."""
    try:
        message = codec.decode(data)
    except WireError:
        return None
    assert type(message) in codec.types.values(), type(message)
    return message


# -- strategies -----------------------------------------------------------------------------------

def _scalars(strict_keys: bool = False) -> st.SearchStrategy[Any]:
    """What msgpack carries, extremes included (no bytes for keys: msgpack maps them to str keys)."""
    keys = st.text(max_size=12) | st.sampled_from(["v", "t", "d", "kind", "node_id", "index", "term", "profile"])
    if strict_keys:
        return keys
    return (st.none() | st.booleans() | st.integers(*INT64) | st.floats() | keys
            | st.binary(max_size=16) | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)))


def structures() -> st.SearchStrategy[Any]:
    """Random nested values that msgpack can pack: lists and maps of scalars, with non-string keys too."""
    return st.recursive(
        _scalars(),
        lambda inner: st.lists(inner, max_size=5)
        | st.dictionaries(_scalars(strict_keys=True) | st.integers(-3, 3), inner, max_size=5),
        max_leaves=25)


def packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _clamped(value: Any) -> Any:
    """`value` with every integer brought into msgpack's range (hypothesis may draw any int for a model
    whose field's bound it does not see; the wire carries none past 64 bits)."""
    if isinstance(value, bool) or not isinstance(value, (int, list, dict)):
        return value
    if isinstance(value, int):
        return value if INT64[0] <= value <= INT64[1] else value % 2**63
    if isinstance(value, list):
        return [_clamped(v) for v in value]
    return {k: _clamped(v) for k, v in value.items()}


def bodies(codec: Codec) -> st.SearchStrategy[tuple[str, Any]]:
    """(tag, body) of a message of one of `codec`'s types, as it would travel: a valid model dumped."""
    return st.one_of(*(st.from_type(t).map(lambda m, t=t: (t.__name__, _clamped(codec.dump(m))))
                       for t in codec.types.values()))


def real_frames(codec: Codec) -> st.SearchStrategy[bytes]:
    return bodies(codec).map(lambda tb: packed({"v": WIRE_VERSION, "t": tb[0], "d": tb[1]}))


def _mutated(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """`value` with one thing somewhere inside it dropped, added, or swapped for a value of another type."""
    if isinstance(value, (dict, list)) and value and depth < 8 and draw(st.booleans()):
        copy: Any = dict(value) if isinstance(value, dict) else list(value)
        at = draw(st.sampled_from(sorted(copy, key=str) if isinstance(copy, dict) else range(len(copy))))
        action = draw(st.sampled_from(["drop", "add", "swap", "deeper"]))
        if action == "drop":
            del copy[at]
        elif action == "add" and isinstance(copy, dict):
            copy[draw(_scalars(strict_keys=True))] = draw(structures())
        elif action == "swap":
            copy[at] = draw(structures())
        else:
            copy[at] = _mutated(draw, copy[at], depth + 1)
        return copy
    return draw(structures())


@st.composite
def mutated_frames(draw: st.DrawFn, codec: Codec) -> bytes:
    """A real message's frame, corrupted as bytes (bit flips, truncation, insertion) or as a structure
    (a field dropped, added or of another type; the envelope's version or tag changed)."""
    tag, body = draw(bodies(codec))
    envelope: dict[Any, Any] = {"v": WIRE_VERSION, "t": tag, "d": body}
    match draw(st.sampled_from(["bytes", "body", "envelope"])):
        case "bytes":
            data = bytearray(packed(envelope))
            for _ in range(draw(st.integers(1, 4))):
                at = draw(st.integers(0, len(data) - 1))
                match draw(st.sampled_from(["flip", "truncate", "insert", "delete"])):
                    case "flip":
                        data[at] ^= 1 << draw(st.integers(0, 7))
                    case "truncate":
                        del data[at:]
                    case "insert":
                        data[at:at] = draw(st.binary(min_size=1, max_size=4))
                    case _:
                        del data[at]
                if not data:
                    break
            return bytes(data)
        case "body":
            envelope["d"] = _mutated(draw, body)
        case _:
            key = draw(st.sampled_from(["v", "t", "d", "extra"]))
            envelope[key] = draw(structures() | st.sampled_from([*codec.types, *CODEC.types, *PIPE_CODEC.types]))
    return packed(envelope)


def frames(codec: Codec) -> st.SearchStrategy[bytes]:
    """Everything the fuzz sends: (a) bytes, (b) random msgpack, (c) valid envelopes of a known tag around
    random data or another type's body, (d) mutations of real messages."""
    tags = st.sampled_from(sorted(codec.types))
    return st.one_of(
        st.binary(max_size=256),
        structures().map(packed),
        st.builds(lambda t, d: packed({"v": WIRE_VERSION, "t": t, "d": d}), tags, structures()),
        st.builds(lambda t, tb: packed({"v": WIRE_VERSION, "t": t, "d": tb[1]}), tags,
                  bodies(CODEC) | bodies(PIPE_CODEC)),
        mutated_frames(codec),
    )


# -- the codecs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@FUZZ
@given(data=st.data())
def test_any_frame_decodes_to_a_registered_message_or_is_refused(codec: Codec, data: st.DataObject) -> None:
    decoded_or_refused(codec, data.draw(frames(codec)))


@pytest.mark.parametrize("codec", CODECS)
@FUZZ
@given(data=st.data())
def test_every_valid_message_survives_a_round_trip(codec: Codec, data: st.DataObject) -> None:
    tag, body = data.draw(bodies(codec))
    message = decoded_or_refused(codec, packed({"v": WIRE_VERSION, "t": tag, "d": body}))
    assume(message is not None)  # clamping an int may break a field's constraint
    assert message is not None
    again = codec.decode(codec.encode(message))
    assert type(again) is type(message) and codec.encode(again) == codec.encode(message)  # NaN != NaN


@FUZZ
@given(stream=st.one_of(
    st.binary(max_size=300),
    st.lists(frames(PIPE_CODEC), max_size=3).map(
        lambda fs: b"".join(len(f).to_bytes(HEADER_SIZE, "big") + f for f in fs)),
    st.lists(real_frames(PIPE_CODEC), min_size=1, max_size=3).flatmap(
        lambda fs: st.integers(0, sum(len(f) + HEADER_SIZE for f in fs)).map(
            lambda cut: b"".join(len(f).to_bytes(HEADER_SIZE, "big") + f for f in fs)[:cut])),
))
def test_the_runner_pipe_reader_yields_messages_then_the_end_or_refuses(stream: bytes) -> None:
    reader = io.BytesIO(stream)
    for _ in range(len(stream) + 1):  # every frame takes at least a header, so this ends
        try:
            message = read_frame(reader)
        except WireError:
            return
        if message is None:
            return
        assert type(message) in PIPE_CODEC.types.values()
    raise AssertionError("read_frame never reached the end of a finite stream")


@FUZZ
@given(data=st.data())
def test_pipe_frames_read_back_as_written(data: st.DataObject) -> None:
    tags_bodies = data.draw(st.lists(bodies(PIPE_CODEC), min_size=1, max_size=4))
    messages = [m for tag, body in tags_bodies
                if (m := decoded_or_refused(PIPE_CODEC, packed({"v": WIRE_VERSION, "t": tag, "d": body})))]
    reader = io.BytesIO(b"".join(pack_frame(m) for m in messages))
    assert [pack_frame(read_frame(reader)) for _ in messages] == [pack_frame(m) for m in messages]  # NaN != NaN
    assert read_frame(reader) is None


# -- every integer off the wire is bounded ----------------------------------------------------------

# Out of every wire integer's bounds (exo.shared.types): negative below -1, or past WIRE_INT_MAX.
OUT_OF_BOUNDS = st.integers(INT64[0], -2) | st.integers(WIRE_INT_MAX + 1, INT64[1])


def _int_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Where `value` holds an integer (not a bool)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _int_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _int_paths(v, (*path, i))
    elif isinstance(value, int) and not isinstance(value, bool):
        yield path


@st.composite
def out_of_bounds_frames(draw: st.DrawFn) -> bytes:
    """A real cluster message with one of its integers (whichever) swapped for one past every bound."""
    tag, body = draw(bodies(CODEC).filter(lambda tb: any(_int_paths(tb[1]))))
    path = draw(st.sampled_from(list(_int_paths(body))))
    inner = body
    for step in path[:-1]:
        inner = inner[step]
    inner[path[-1]] = draw(OUT_OF_BOUNDS)
    return packed({"v": WIRE_VERSION, "t": tag, "d": body})


@FUZZ
@given(frame=out_of_bounds_frames())
def test_a_message_with_any_integer_out_of_bounds_is_refused_at_decode(frame: bytes) -> None:
    # Regression (issue 12, item 1): a heartbeat's term of 2**64-1 decoded, and the node's claim of
    # 2**64 could not be encoded: the node died, then died again at every restart.
    with pytest.raises(WireError, match="invalid"):
        CODEC.decode(frame)


def _unbounded_ints(schema: Any, path: str = "") -> Iterator[str]:
    """Where a JSON schema allows an integer without both a minimum and a maximum."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer" and not {"minimum", "maximum"} <= schema.keys():
            yield path
        for key, value in schema.items():
            yield from _unbounded_ints(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _unbounded_ints(value, f"{path}[{i}]")


def test_every_integer_a_cluster_message_holds_is_bounded() -> None:
    unbounded = [t.__name__ + path for t in CODEC.types.values() for path in _unbounded_ints(t.model_json_schema())]
    assert not unbounded, unbounded


# -- a coordinator fed whatever decodes -----------------------------------------------------------

CLUSTER = "exo"


def _profile(node_id: str) -> NodeProfile:
    return NodeProfile(node_id=NodeId(node_id), hostname="h", version=__version__, address="127.0.0.1",
                       api_port=52415, memory_total=16 << 30, memory_available=8 << 30, cpu_count=4,
                       accelerator="cpu", mlx_device="cpu")


COORDINATOR_INPUTS = ["Heartbeat", "Leave", "EventBatch", "Snapshot"]  # what Coordinator.receive acts on


def _from_cluster(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """Make `body` look like it comes from this cluster: a peer, the master or a stranger, in a term near
    ours, with events numbered on from about where the state is, so it is acted on and not just ignored."""
    ids = st.sampled_from(["self", "peer", "other"])
    small = st.integers(-1, 4)
    for key, value in list(body.items()):
        if key == "cluster":
            body[key] = CLUSTER
        elif key == "version":
            body[key] = __version__
        elif key in ("master_id", "node_id"):
            body[key] = draw(ids)
        elif key in ("term", "synced_term", "last_event_index"):
            body[key] = draw(small)
        elif key == "profile" and isinstance(value, dict):
            value.update(version=__version__, node_id=draw(ids))
        elif key == "events" and isinstance(value, list):
            first = draw(st.integers(0, 3))
            for i, event in enumerate(value):
                if isinstance(event, dict):
                    event.update(index=first + i, term=draw(small))
        elif key == "state" and isinstance(value, dict):
            value.update(last_event_index=draw(small), term=draw(small))


@st.composite
def hostile_messages(draw: st.DrawFn) -> FrozenModel:
    """A frame that decodes to a message the coordinator acts on, mostly made to look like it comes from
    this cluster, whatever else it holds (a fake peer's profile, a snapshot of any state, ...)."""
    tag = draw(st.sampled_from(COORDINATOR_INPUTS))
    body = _clamped(CODEC.dump(draw(st.from_type(CODEC.types[tag]))))
    if draw(st.integers(0, 9)):
        _from_cluster(draw, body)
    message = decoded_or_refused(CODEC, packed({"v": WIRE_VERSION, "t": tag, "d": body}))
    assume(message is not None)
    assert message is not None
    return message


@pytest.mark.parametrize("role", ["master", "follower", "starting"])
@settings(FUZZ, max_examples=100)
@given(messages=st.lists(hostile_messages(), min_size=1, max_size=6))
def test_a_coordinator_takes_whatever_decodes_without_raising_or_saying_what_cannot_be_sent(
        role: str, messages: list[FrozenModel]) -> None:
    coordinator = Coordinator(_profile("self"), cluster=CLUSTER, peer_timeout=2.0)
    now = 0.0
    if role != "starting":
        coordinator.tick(now)
        now = 1.5
        if role == "follower":  # a peer that claims mastership at a higher term
            peer = Heartbeat(cluster=CLUSTER, version=__version__, profile=_profile("peer"), term=1,
                             master_id=NodeId("peer"), synced_term=1, last_event_index=0)
            coordinator.receive(peer, now)
        coordinator.tick(now)
        assert coordinator.is_master == (role == "master")
    for message in messages:
        now += 0.25
        out = coordinator.receive(message, now) + coordinator.tick(now)
        for item in out:  # what a node cannot encode would raise in its send loop, and stop it
            CODEC.encode(item.message)


# -- a peer's address, whatever it says -----------------------------------------------------------


@pytest.mark.parametrize("port", [-5, 0, 65536, 2**40])
def test_a_heartbeat_with_a_port_no_socket_can_use_is_refused(port: int) -> None:
    # Regression: such a heartbeat decoded, the node learned the address, and its next send to it raised
    # OverflowError out of the send loop and stopped the node.
    body = CODEC.dump(Heartbeat(cluster=CLUSTER, version=__version__, profile=_profile("peer"), term=0,
                                master_id=None, synced_term=-1, last_event_index=-1))
    body["profile"]["api_port"] = port
    with pytest.raises(WireError, match="invalid Heartbeat"):
        CODEC.decode(packed({"v": WIRE_VERSION, "t": "Heartbeat", "d": body}))


@pytest.mark.parametrize("host", ["::1", "a b", "", "127.0.0.1"])
async def test_sending_to_an_address_no_request_can_go_to_only_logs(host: str) -> None:
    # Regression: an error other than httpx.HTTPError (InvalidURL for an IPv6 host, an ExceptionGroup
    # around OverflowError for a bad port) escaped the send loop and stopped the node.
    transport = PeerTransport(timeout=1.0)
    try:
        transport.learn(NodeId("peer"), host, 70000)
        with anyio.fail_after(10):
            await transport.send(None, Heartbeat(cluster=CLUSTER, version=__version__, profile=_profile("self"),
                                                 term=0, master_id=None, synced_term=-1, last_event_index=-1))
    finally:
        await transport.aclose()


# -- a live node ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peer(node: RunningNode) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=node.url, timeout=30) as client:
        yield client


@settings(FUZZ)
@given(frame=frames(CODEC))
def test_a_live_node_answers_every_malformed_frame_with_a_4xx_in_the_error_shape(peer: httpx.Client,
                                                                                  frame: bytes) -> None:
    # Only frames this codec refuses go to the session's node: one that decodes would be a message
    # from a fake peer (a heartbeat, a snapshot) and change the node's cluster state under later tests.
    assume(decoded_or_refused(CODEC, frame) is None)
    response = peer.post(MESSAGE_PATH, content=frame, headers={"Content-Type": "application/msgpack"})
    # 401 once the node checks a cluster secret before decoding; never a 5xx.
    assert response.status_code in (400, 401), (response.status_code, response.text[:300], frame[:100])
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]


@settings(FUZZ, max_examples=50)
@given(frame=out_of_bounds_frames())
def test_a_live_node_refuses_messages_with_integers_out_of_bounds_with_a_400(peer: httpx.Client,
                                                                            frame: bytes) -> None:
    response = peer.post(MESSAGE_PATH, content=frame, headers={"Content-Type": "application/msgpack"})
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert "invalid" in response.json()["error"]["message"]


@settings(FUZZ, max_examples=20)
@given(content_type=st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain",
                                     "multipart/form-data; boundary=x", ""]) | st.text(max_size=30),
       frame=real_frames(CODEC))
def test_a_live_node_refuses_cluster_messages_of_another_content_type(peer: httpx.Client, content_type: str,
                                                                      frame: bytes) -> None:
    assume(content_type.partition(";")[0].strip().lower() != "application/msgpack")
    assume(content_type.isascii() and content_type.isprintable())
    response = peer.post(MESSAGE_PATH, content=frame, headers={"Content-Type": content_type})
    assert response.status_code == 415, (response.status_code, response.text[:300])
    assert response.json()["error"]["message"]


@settings(FUZZ, max_examples=10)
@given(size=st.integers(MAX_FRAME_BYTES + 1, MAX_FRAME_BYTES + (1 << 20)))
def test_a_live_node_refuses_frames_over_the_cap_with_a_413(peer: httpx.Client, size: int) -> None:
    response = peer.post(MESSAGE_PATH, content=b"\x91" * size, headers={"Content-Type": "application/msgpack"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "frame_too_large"


def test_a_live_node_is_healthy_after_the_malformed_frames(peer: httpx.Client) -> None:
    for content in (b"", b"\xc1", b"\x00" * 10_000, b"\x91" * 100_000, packed({"v": 1, "t": "Heartbeat", "d": {}})):
        assert peer.post(MESSAGE_PATH, content=content, headers={"Content-Type": "application/msgpack"}).status_code \
            in (400, 401)
    health = peer.get("/health")
    assert health.status_code == 200 and health.json()["runners_ready"] == 1
