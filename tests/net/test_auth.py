"""Proof of the cluster secret: signed frames are taken once, within the window, and nothing else is."""

from __future__ import annotations

from pathlib import Path

import pytest

from exo.config import Config
from exo.net.auth import WINDOW, AuthError, ClusterAuth, Throttle
from exo.net.messages import CODEC, EventBatch
from exo.shared.types import NodeId

FRAME = CODEC.encode(EventBatch(term=3, master_id=NodeId("a"), events=[]))


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pair(secret: str = "s3cret", other: str | None = None) -> tuple[ClusterAuth, ClusterAuth, Clock]:
    """A sender and a receiver on one clock (the receiver holding `other` if given)."""
    clock = Clock()
    return ClusterAuth(secret, clock=clock), ClusterAuth(other or secret, clock=clock), clock


def test_a_signed_frame_is_taken_once() -> None:
    sender, receiver, _ = pair()
    proof = sender.sign(FRAME)
    receiver.verify(proof, FRAME)
    with pytest.raises(AuthError, match="replayed"):
        receiver.verify(proof, FRAME)
    receiver.verify(sender.sign(FRAME), FRAME)  # the same message signed again is a new frame


@pytest.mark.parametrize(
    ("proof", "frame", "reason"),
    [
        (None, FRAME, "no x-exo-auth header"),
        ("", FRAME, "no x-exo-auth header"),
        ("garbage", FRAME, "malformed"),
        ("1700000000000.0123456789abcdef." + "0" * 64, FRAME, "wrong cluster secret"),
        ("1700000000000.0123456789abcdef." + "é" * 64, FRAME, "malformed"),
        ("sign", FRAME + b"\x00", "altered"),  # a valid proof over another frame
    ],
)
def test_frames_without_a_valid_proof_are_refused(proof: str | None, frame: bytes, reason: str) -> None:
    sender, receiver, _ = pair()
    with pytest.raises(AuthError, match=reason):
        receiver.verify(sender.sign(FRAME) if proof == "sign" else proof, frame)


def test_a_frame_signed_with_another_secret_is_refused() -> None:
    sender, receiver, _ = pair("ours", other="theirs")
    with pytest.raises(AuthError, match="wrong cluster secret"):
        receiver.verify(sender.sign(FRAME), FRAME)


@pytest.mark.parametrize("offset", [-WINDOW - 1, WINDOW + 1])
def test_frames_outside_the_window_are_refused(offset: float) -> None:
    sender, receiver, clock = pair()
    proof = sender.sign(FRAME)
    clock.now += offset  # the frame is old, or (from a node with a clock ahead) from the future
    with pytest.raises(AuthError, match="off this node's clock"):
        receiver.verify(proof, FRAME)


def test_a_frame_within_the_window_is_taken() -> None:
    sender, receiver, clock = pair()
    proof = sender.sign(FRAME)
    clock.now -= WINDOW - 1  # sender's clock 59 s ahead
    receiver.verify(proof, FRAME)


def test_the_seen_set_forgets_only_what_the_window_refuses_anyway() -> None:
    sender, receiver, clock = pair()
    old = sender.sign(FRAME)
    receiver.verify(old, FRAME)
    clock.now += WINDOW / 2
    recent = sender.sign(FRAME)
    receiver.verify(recent, FRAME)
    clock.now += WINDOW / 2 + 1
    receiver.verify(sender.sign(FRAME), FRAME)  # prunes `old`, now outside the window
    assert len(receiver._seen) == 2
    with pytest.raises(AuthError, match="off this node's clock"):
        receiver.verify(old, FRAME)
    with pytest.raises(AuthError, match="replayed"):
        receiver.verify(recent, FRAME)


def test_the_seen_set_is_bounded() -> None:
    clock = Clock()
    sender, receiver = ClusterAuth("s", clock=clock), ClusterAuth("s", clock=clock, max_seen=10)
    for _ in range(25):
        receiver.verify(sender.sign(FRAME), FRAME)
    assert len(receiver._seen) == 10


def test_announcements_prove_the_secret_for_their_node_cluster_and_port() -> None:
    ours, theirs = ClusterAuth("s3cret"), ClusterAuth("other")
    proof = ours.announcement("node-a", "exo", 52415)
    assert "s3cret" not in proof
    assert ours.announced(proof, "node-a", "exo", 52415)
    assert not theirs.announced(proof, "node-a", "exo", 52415)
    assert not ours.announced(proof, "node-b", "exo", 52415)  # copied onto another node
    assert not ours.announced(proof, "node-a", "exo", 52416)
    assert not ours.announced(theirs.announcement("node-a", "exo", 52415), "node-a", "exo", 52415)
    assert not ours.announced(None, "node-a", "exo", 52415)
    assert not ours.announced("ü" * 64, "node-a", "exo", 52415)


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        ClusterAuth("")


def test_throttle_lets_one_through_per_key_and_period() -> None:
    clock = Clock(0.0)
    throttle = Throttle(30.0, clock=clock)
    assert throttle("10.0.0.1") and not throttle("10.0.0.1") and throttle("10.0.0.2")
    clock.now += 29
    assert not throttle("10.0.0.1")
    clock.now += 1
    assert throttle("10.0.0.1")


def test_the_secret_comes_from_flags_the_environment_or_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("secret-from-the-file\n")
    assert Config.from_env({}).cluster_secret is None
    assert Config.from_env({"EXO_CLUSTER_SECRET_FILE": str(secret_file)}).cluster_secret == "secret-from-the-file"
    env = {"EXO_CLUSTER_SECRET": "secret-from-the-env", "EXO_API_KEY": "sk-key-from-the-env"}
    assert Config.from_env(env).cluster_secret == "secret-from-the-env"
    assert Config.from_env(env, cluster_secret="secret-from-a-flag").cluster_secret == "secret-from-a-flag"
    config = Config.from_env({"EXO_API_KEY": "sk-key-from-the-env"})
    assert config.api_key == "sk-key-from-the-env" and "sk-key-from-the-env" not in repr(config)
    secret_file.write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        Config.from_env({"EXO_CLUSTER_SECRET_FILE": str(secret_file)})
