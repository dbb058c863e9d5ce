"""Proof of the cluster secret: signed frames are taken once, within the window, and nothing else is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def auth(secret: str, node_id: str, clock: Clock, **kwargs: Any) -> ClusterAuth:
    return ClusterAuth(secret, node_id=node_id, cluster="exo", clock=clock, **kwargs)


def pair(secret: str = "s3cret", other: str | None = None) -> tuple[ClusterAuth, ClusterAuth, Clock]:
    """A sender ("a") and a receiver ("b") on one clock (the receiver holding `other` if given)."""
    clock = Clock()
    return auth(secret, "a", clock), auth(other or secret, "b", clock), clock


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
        ("1700000000000.0123456789abcdef.a.b." + "0" * 64, FRAME, "wrong cluster secret"),
        ("1700000000000.0123456789abcdef.a.*." + "0" * 64, FRAME, "wrong cluster secret"),
        ("1700000000000.0123456789abcdef." + "0" * 64, FRAME, "malformed"),  # no sender and receiver
        ("1700000000000.0123456789abcdef.a.b." + "é" * 64, FRAME, "malformed"),
        ("1700000000000.0123456789abcdef.a b.b." + "0" * 64, FRAME, "malformed"),
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
    sender, receiver = auth("s", "a", clock), auth("s", "b", clock, max_seen=10)
    for _ in range(25):
        receiver.verify(sender.sign(FRAME), FRAME)
    assert len(receiver._seen) == 10


def test_announcements_prove_the_secret_for_their_node_cluster_and_port() -> None:
    ours, theirs = ClusterAuth("s3cret", node_id="a", cluster="exo"), ClusterAuth("other", node_id="a", cluster="exo")
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
        ClusterAuth("", node_id="a", cluster="exo")


def test_a_frame_replayed_to_a_third_node_is_refused() -> None:
    # Regression (issue 12, item 10): the MAC covered only time, nonce and frame, so a heartbeat sniffed on
    # its way to one node could be played to another, which then took the player's address for the sender.
    sender, receiver, clock = pair()
    third = auth("s3cret", "c", clock)
    proof = sender.sign(FRAME, "b")
    with pytest.raises(AuthError, match="a frame for node b, not this one"):
        third.verify(proof, FRAME)
    assert receiver.verify(proof, FRAME).sender == "a"


def test_a_frame_with_its_receiver_rewritten_is_refused() -> None:
    sender, _, clock = pair()
    third = auth("s3cret", "c", clock)
    ms, nonce, frm, _, mac = sender.sign(FRAME, "b").split(".")
    for to in ("c", "*"):
        with pytest.raises(AuthError, match="wrong cluster secret"):
            third.verify(".".join((ms, nonce, frm, to, mac)), FRAME)


def test_a_frame_with_its_sender_changed_is_refused() -> None:
    sender, receiver, _ = pair()
    ms, nonce, _, to, mac = sender.sign(FRAME, "b").split(".")
    with pytest.raises(AuthError, match="wrong cluster secret"):
        receiver.verify(".".join((ms, nonce, "c", to, mac)), FRAME)


def test_a_frame_of_another_cluster_is_refused() -> None:
    clock = Clock()
    sender = ClusterAuth("s3cret", node_id="a", cluster="other", clock=clock)
    with pytest.raises(AuthError, match="wrong cluster secret"):
        auth("s3cret", "b", clock).verify(sender.sign(FRAME, "b"), FRAME)


def test_a_frame_to_an_unknown_receiver_is_taken_by_any_node_and_says_so() -> None:
    sender, receiver, clock = pair()
    proof = receiver.verify(sender.sign(FRAME), FRAME)
    assert (proof.sender, proof.receiver, proof.addressed) == ("a", "*", False)
    assert auth("s3cret", "c", clock).verify(sender.sign(FRAME, None), FRAME).addressed is False


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
