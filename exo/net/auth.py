"""Proof of the shared cluster secret, so that only nodes holding it can join a cluster.

The key is the cluster secret (`--cluster-secret`), or where a node has none, its API key (`--api-key`):
either way every node of a cluster holds the same one, and it never travels.

Every frame a node POSTs to a peer's `/cluster/message` carries `x-exo-auth: <ms>.<nonce>.<from>.<to>.<mac>`:
an HMAC-SHA256, keyed with the secret, over the cluster name, the sender's node id, the receiver's node id,
the sender's wall-clock time in milliseconds, a random nonce and the frame. A receiver takes a frame only if
the MAC matches, the frame names it as receiver (or `*`, see below), the time is within `WINDOW` seconds of
its own clock, it has not seen that MAC before (a bounded set of the MACs still inside the window), and the
message inside is the named sender's own. So a recorded frame can be played back neither to the node it
was sent to nor to another one, and cannot be passed off as another node's. Zeroconf announcements carry
an HMAC of (node id, cluster, port) in their TXT record, so strangers' announcements are ignored.

What this does not do, honestly:
- It does not encrypt. Anyone on the network can read cluster messages (node profiles, the state); they
  cannot forge or alter them. With the API key as the secret, whoever holds the key (every API client, and
  anyone who reads it off an unencrypted HTTP request) can act as a node of the cluster.
- A node sends to an address whose node it does not know yet (a `--peers` seed, an announced peer, before
  its first answer, which names it in `x-exo-node`) with `to` = `*`. Such a frame could be played to a
  third node within the window; that node then hears a genuine, slightly old message, and takes the
  player's address for the sender only if it knew no address for it (see PeerTransport.learn).
- Announcement proofs are static: copying one only makes us POST signed frames to the copier, which it
  cannot answer with frames of its own. Admission rests on the signed frames alone.
- Pipeline rings: runners learn their ring peers' addresses only from the cluster state, which only
  authenticated frames change, so no outsider can insert itself into a ring's address list. MLX's ring
  sockets themselves carry no authentication, though: whoever can reach a runner's ring port while the
  ring forms can connect to it. Keep ring traffic on a trusted network or behind a firewall.
- Clocks of the nodes must agree within `WINDOW` seconds (run NTP); a node whose clock is off is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

HEADER = "x-exo-auth"
WINDOW = 60.0  # seconds a frame's timestamp may be off the receiver's clock, either way
MAX_SEEN = 65_536  # MACs remembered against replay: about a minute of 250 nodes heartbeating at 4 Hz

ANY = "*"  # the receiver of a frame sent to an address whose node id the sender does not know yet
_PROOF = re.compile(r"(\d{1,15})\.([0-9a-f]{16})\.([\w-]{1,64})\.([\w-]{1,64}|\*)\.([0-9a-f]{64})", re.ASCII)


class AuthError(ValueError):
    """A frame without a valid proof of the cluster secret."""


def _mac(key: bytes, *parts: bytes) -> str:
    """HMAC-SHA256 over length-prefixed parts, so no two different part lists sign alike."""
    return hmac.new(key, b"".join(len(p).to_bytes(8, "big") + p for p in parts), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Proof:
    """A parsed `HEADER` value."""

    ms: str
    nonce: str
    sender: str
    receiver: str  # a node id, or ANY
    mac: str

    @property
    def addressed(self) -> bool:
        """Whether the frame names this receiver (not ANY): only such a frame may re-point a known peer."""
        return self.receiver != ANY


class ClusterAuth:
    """Signs this node's frames and announcements, and checks peers' (each frame is taken once)."""

    def __init__(self, secret: str, *, node_id: str, cluster: str, window: float = WINDOW,
                 max_seen: int = MAX_SEEN, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("the cluster secret is empty")
        self._key, self.window, self.max_seen, self.clock = secret.encode(), window, max_seen, clock
        self.node_id, self.cluster = node_id, cluster
        self._seen: OrderedDict[str, float] = OrderedDict()  # MAC -> its frame's time, in arrival order

    def _frame_mac(self, proof: Proof, frame: bytes) -> str:
        return _mac(self._key, b"frame", self.cluster.encode(), proof.sender.encode(), proof.receiver.encode(),
                    proof.ms.encode(), proof.nonce.encode(), frame)

    def sign(self, frame: bytes, to: str | None = None) -> str:
        """The `HEADER` value for `frame` sent to node `to` (None: whichever node is at the address); a new
        one each call (a fresh nonce)."""
        ms, nonce, to = str(int(self.clock() * 1000)), secrets.token_hex(8), to or ANY
        mac = self._frame_mac(Proof(ms, nonce, self.node_id, to, ""), frame)
        return f"{ms}.{nonce}.{self.node_id}.{to}.{mac}"

    def check(self, header: str | None) -> Proof:
        """What can be checked before the frame is read: the header's shape, its receiver and its time."""
        if not header:
            raise AuthError(f"no {HEADER} header: the sender has no cluster secret")
        if (match := _PROOF.fullmatch(header)) is None:
            raise AuthError(f"malformed {HEADER} header")
        proof = Proof(*match.groups())
        if proof.receiver not in (ANY, self.node_id):
            raise AuthError(f"a frame for node {proof.receiver}, not this one: a replay, or a stale address")
        now, sent = self.clock(), int(proof.ms) / 1000
        if abs(now - sent) > self.window:
            raise AuthError(f"frame time is {now - sent:+.0f}s off this node's clock, more than {self.window:.0f}s "
                            "allow: a replay, or clocks out of sync (run NTP)")
        return proof

    def verify(self, header: str | None, frame: bytes) -> Proof:
        """Accept `frame` once, and say who sent it; raises AuthError saying why it is refused."""
        proof = self.check(header)
        if not hmac.compare_digest(mac := proof.mac, self._frame_mac(proof, frame)):
            raise AuthError("wrong cluster secret (or a frame altered on the way)")
        now, sent = self.clock(), int(proof.ms) / 1000
        while self._seen and next(iter(self._seen.values())) < now - self.window:
            self._seen.popitem(last=False)  # out of the window: the time check refuses it from now on
        if mac in self._seen:
            raise AuthError("a replayed frame")
        self._seen[mac] = sent
        if len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        return proof

    def announcement(self, node_id: str, cluster: str, port: int) -> str:
        """The proof a zeroconf announcement of this node carries (in its TXT record)."""
        return _mac(self._key, b"announce", node_id.encode(), cluster.encode(), str(port).encode())

    def announced(self, proof: str | None, node_id: str, cluster: str, port: int) -> bool:
        """Whether an announcement's proof shows its node holds the secret."""
        expected = self.announcement(node_id, cluster, port).encode()
        return proof is not None and hmac.compare_digest(proof.encode(), expected)


class Throttle:
    """`throttle(key)` is True at most once per `every` seconds per key: for warnings that a peer
    heartbeating four times a second would otherwise repeat four times a second."""

    def __init__(self, every: float = 30.0, *, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.max_keys, self.clock = every, max_keys, clock
        self._last: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = self.clock()
        if key in self._last and now - self._last[key] < self.every:
            return False
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = now
        return True
