"""Proof of the shared cluster secret, so that only nodes holding it can join a cluster.

Every frame a node POSTs to a peer's `/cluster/message` carries `x-exo-auth: <ms>.<nonce>.<mac>`: an
HMAC-SHA256, keyed with the secret, over the sender's wall-clock time in milliseconds, a random nonce and
the frame. A receiver takes a frame only if the MAC matches, the time is within `WINDOW` seconds of its
own clock, and it has not seen that MAC before (a bounded set of the MACs still inside the window), so a
recorded frame cannot be played back to it. Zeroconf announcements carry an HMAC of (node id, cluster,
port) in their TXT record, so strangers' announcements are ignored; the secret itself never travels.

What this does not do, honestly:
- It does not encrypt. Anyone on the network can read cluster messages (node profiles, the state); they
  cannot forge, alter or replay them to the node they were sent to. A frame recorded on its way to one
  node could be played to another within the window (each node keeps its own seen-set); that node then
  hears a genuine, slightly old message.
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

HEADER = "x-exo-auth"
WINDOW = 60.0  # seconds a frame's timestamp may be off the receiver's clock, either way
MAX_SEEN = 65_536  # MACs remembered against replay: about a minute of 250 nodes heartbeating at 4 Hz

_PROOF = re.compile(r"(\d{1,15})\.([0-9a-f]{16})\.([0-9a-f]{64})", re.ASCII)


class AuthError(ValueError):
    """A frame without a valid proof of the cluster secret."""


def _mac(key: bytes, *parts: bytes) -> str:
    """HMAC-SHA256 over length-prefixed parts, so no two different part lists sign alike."""
    return hmac.new(key, b"".join(len(p).to_bytes(8, "big") + p for p in parts), hashlib.sha256).hexdigest()


class ClusterAuth:
    """Signs this node's frames and announcements, and checks peers' (each frame is taken once)."""

    def __init__(self, secret: str, *, window: float = WINDOW, max_seen: int = MAX_SEEN,
                 clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("the cluster secret is empty")
        self._key, self.window, self.max_seen, self.clock = secret.encode(), window, max_seen, clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # MAC -> its frame's time, in arrival order

    def sign(self, frame: bytes) -> str:
        """The `HEADER` value for `frame`; a new one each call (a fresh nonce)."""
        ms, nonce = str(int(self.clock() * 1000)), secrets.token_hex(8)
        return f"{ms}.{nonce}.{_mac(self._key, b'frame', ms.encode(), nonce.encode(), frame)}"

    def verify(self, proof: str | None, frame: bytes) -> None:
        """Accept `frame` once; raises AuthError saying why it is refused."""
        if not proof:
            raise AuthError(f"no {HEADER} header: the sender has no cluster secret")
        if (match := _PROOF.fullmatch(proof)) is None:
            raise AuthError(f"malformed {HEADER} header")
        ms, nonce, mac = match.groups()
        if not hmac.compare_digest(mac, _mac(self._key, b"frame", ms.encode(), nonce.encode(), frame)):
            raise AuthError("wrong cluster secret (or a frame altered on the way)")
        now, sent = self.clock(), int(ms) / 1000
        if abs(now - sent) > self.window:
            raise AuthError(f"frame time is {now - sent:+.0f}s off this node's clock, more than {self.window:.0f}s "
                            "allow: a replay, or clocks out of sync (run NTP)")
        while self._seen and next(iter(self._seen.values())) < now - self.window:
            self._seen.popitem(last=False)  # out of the window: the time check refuses it from now on
        if mac in self._seen:
            raise AuthError("a replayed frame")
        self._seen[mac] = sent
        if len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)

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
