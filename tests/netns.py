"""Network namespaces for fault tests: hosts on a private bridge whose cables a test can pull.

    root ns:  exoh<pid> (10.213.X.254) ══ host ──┐
                                                 br0   in namespace exo-t<pid>-br
    exo-t<pid>-0:  eth0 (10.213.X.1) ══ n0 ──────┤
    exo-t<pid>-1:  eth0 (10.213.X.2) ══ n1 ──────┤
    ...

The bridge has a namespace of its own, so `cut(i)` (`ip link set n<i> down` there) is a pulled cable:
neither end gets an error, packets just vanish, as on a real network. The test process stays in the
root namespace and reaches the hosts through one veth into the bridge: that veth, with the route to
its /24 that goes with it, is the only thing this adds to the root namespace. Everything is deleted on
exit, also when the test failed, and the exit asserts that nothing is left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Lab", "lab", "unavailable"]


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why this machine cannot run namespace tests, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (`ip netns add` is refused to other users)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    probe = f"exo-t{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError) as e:
        return f"`ip netns add` failed: {e}"
    _ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Lab:
    prefix: str          # every namespace's name starts with it
    subnet: str          # "10.213.X", a /24 used by nothing else on this machine
    hosts: tuple[str, ...]  # the hosts' namespaces, in order

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def host_link(self) -> str:
        return f"exoh{os.getpid()}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def run_in(self, i: int) -> list[str]:
        """The command prefix that runs a program in host `i`'s namespace (it execs, keeping the pid)."""
        return ["ip", "netns", "exec", self.hosts[i]]

    def cut(self, i: int) -> None:
        """Pull host `i`'s cable: its traffic to and from everyone stops, without an error at either end."""
        _ip("-n", self.bridge, "link", "set", f"n{i}", "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.bridge, "link", "set", f"n{i}", "up")

    def pids(self) -> list[int]:
        """Processes still running in the hosts' namespaces."""
        return [int(p) for ns in self.hosts for p in _ip("netns", "pids", ns).split()]


def _free_subnet() -> str:
    """A 10.213.X.0/24 that no address or route of the root namespace touches."""
    used = _ip("-4", "addr") + _ip("-4", "route")
    start = os.getpid() % 250
    for x in [(start + k) % 250 + 1 for k in range(250)]:
        if f"10.213.{x}." not in used:
            return f"10.213.{x}"
    raise RuntimeError("every 10.213.X.0/24 is in use")


def ours(prefix: str, host_link: str) -> list[str]:
    """What of ours exists: namespaces named with `prefix`, and the root namespace's veth."""
    found = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.startswith(prefix)]
    links = _ip("-o", "link").splitlines()
    return found + [host_link for line in links if re.search(rf":\s{re.escape(host_link)}[@:]", line)]


@contextmanager
def lab(n: int) -> Iterator[Lab]:
    """`n` hosts, each in its own namespace, on one bridge the root namespace also reaches."""
    prefix = f"exo-t{os.getpid()}-"
    built = Lab(prefix=prefix, subnet=_free_subnet(), hosts=tuple(f"{prefix}{i}" for i in range(n)))
    try:
        br = built.bridge
        _ip("netns", "add", br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for i, ns in enumerate(built.hosts):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # made in the bridge's namespace, the other end moved into the host's: the root's never sees them
            _ip("-n", br, "link", "add", f"n{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", br, "link", "set", f"n{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{built.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("link", "add", built.host_link, "type", "veth", "peer", "name", "host", "netns", br)
        _ip("-n", br, "link", "set", "host", "master", "br0", "up")
        _ip("addr", "add", f"{built.subnet}.254/24", "dev", built.host_link)
        _ip("link", "set", built.host_link, "up")
        yield built
    finally:
        _teardown(built)


def _teardown(built: Lab) -> None:
    """Kill what still runs in the namespaces (only processes the test started live there), delete
    the namespaces and the root's veth, and assert that none of it is left."""
    stray = []
    for ns in built.hosts:
        try:
            stray += [int(p) for p in _ip("netns", "pids", ns).split()]
        except RuntimeError:
            pass  # never made
    for pid in stray:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for name in [*built.hosts, built.bridge]:
        if name in _ip("netns", "list").split():
            _ip("netns", "del", name)  # its veths go with it, and so their other ends
    if built.host_link in ours(built.prefix, built.host_link):
        _ip("link", "del", built.host_link)
    deadline = time.monotonic() + 5
    while (left := ours(built.prefix, built.host_link)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left behind after the test: {left}"
    assert not stray, f"processes still ran in the test's namespaces and were killed: {stray}"
