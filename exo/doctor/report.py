"""What `exo doctor` found, as typed records (`--json` prints them), the issues among it, and its text form."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import computed_field

from exo.shared.runners import RunnerStatus
from exo.shared.types import FrozenModel

NO_ISSUES = "no issues"


class IssueKind(StrEnum):
    """An issue's value is what the verdict line says; listed from the most to the least pressing."""

    ORPHANED_RUNNERS = "orphaned runners found"
    PORT_TAKEN = "API port held by another program"
    NO_NODE = "no exo node running"
    API_DOWN = "node API not answering"
    STALLED = "node stalled"
    RUNNER_FAILED = "runner failed"
    NO_MASTER = "no master elected"


class Issue(FrozenModel):
    kind: IssueKind
    detail: str


class RunnerProcess(FrozenModel):
    """A process carrying the runner marker `-m exo.worker.runner SPEC NODE_PID`."""

    pid: int
    node_pid: int
    runner_id: str | None  # `instance.rank`, from the spec on its command line
    rss: int
    ports: tuple[int, ...] = ()  # TCP ports it listens on
    create_time: float = 0.0  # tells it from a later process given the same pid


class OrphanedRunner(RunnerProcess):
    reason: str


class NodeProcess(FrozenModel):
    """An `exo` node (`-m exo.main` or the `exo` script, without a tool command) and its runners."""

    pid: int
    args: tuple[str, ...]
    rss: int
    ports: tuple[int, ...] = ()
    discovery: bool = False  # it holds the mDNS port, so it advertises and browses
    runners: tuple[RunnerProcess, ...] = ()


class StateRunner(FrozenModel):
    runner_id: str
    status: str
    pid: int | None
    port: int
    error: str | None = None


class PeerSeen(FrozenModel):
    node_id: str
    address: str | None  # host:port of its API, from its profile in the state
    seconds_since_heartbeat: float | None
    kernel_path: str | None = None  # from its profile


class ClusterView(FrozenModel):
    """The answering node's view of the cluster, from its /state."""

    node_id: str
    master_id: str | None
    is_master: bool
    term: int
    nodes: tuple[str, ...]
    peers: tuple[PeerSeen, ...]
    runners: tuple[StateRunner, ...]  # this node's
    kernel_path: str | None = None  # exo.kernels' code path on this node, from its profile
    kernel_reason: str | None = None


class ApiStatus(FrozenModel):
    url: str
    answering: bool
    error: str | None = None
    health: dict[str, Any] | None = None


class ServiceSeen(FrozenModel):
    name: str
    node_id: str | None
    cluster: str | None
    version: str | None
    addresses: tuple[str, ...]
    port: int | None


class Browse(FrozenModel):
    """A short mDNS browse for `_exo._tcp` from this machine; `ran` is False under --no-browse."""

    ran: bool
    seconds: float = 0.0
    services: tuple[ServiceSeen, ...] = ()
    error: str | None = None


class Report(FrozenModel):
    version: str
    host: str
    platform: str
    nodes: tuple[NodeProcess, ...]
    orphans: tuple[OrphanedRunner, ...]
    rss_total: int  # bytes held by nodes, their runners and orphans
    memory_available: int
    api: ApiStatus
    cluster: ClusterView | None
    browse: Browse
    port_holder: str | None = None  # who holds the API port when no exo node answers on it
    issues: tuple[Issue, ...] = ()
    notes: tuple[str, ...] = ()

    @computed_field  # type: ignore[prop-decorator]
    @property
    def verdict(self) -> str:
        """The issues' kinds, most pressing first, or "no issues"."""
        return "; ".join(dict.fromkeys(issue.kind.value for issue in self.issues)) or NO_ISSUES


def find_issues(report: Report) -> tuple[tuple[Issue, ...], tuple[str, ...]]:
    """The issues in `report` (each makes `exo doctor` exit 1), most pressing first, and notes that are not."""
    issues, notes = [], []
    for orphan in report.orphans:
        issues.append(Issue(kind=IssueKind.ORPHANED_RUNNERS, detail=f"{_runner(orphan)}: {orphan.reason}"))
    if report.port_holder:
        issues.append(Issue(kind=IssueKind.PORT_TAKEN, detail=f"{report.api.url}: {report.port_holder}"))
    if not report.api.answering:
        kind = IssueKind.API_DOWN if report.nodes else IssueKind.NO_NODE
        issues.append(Issue(kind=kind, detail=f"{report.api.url}: {report.api.error}"))
    health = report.api.health or {}
    if health.get("status") == "stalled":
        issues.append(Issue(kind=IssueKind.STALLED, detail=f"no progress for {health.get('seconds_since_progress')} s "
                                                           "with requests in flight"))
    cluster = report.cluster
    for runner in cluster.runners if cluster else ():
        if runner.status == RunnerStatus.FAILED:
            issues.append(Issue(kind=IssueKind.RUNNER_FAILED, detail=f"runner={runner.runner_id}: {runner.error}"))
    if cluster and cluster.master_id is None:
        issues.append(Issue(kind=IssueKind.NO_MASTER, detail=f"node={cluster.node_id} term={cluster.term}"))
    if len(report.nodes) > 1:
        notes.append(f"{len(report.nodes)} nodes on this host (expected one, unless it runs a local cluster)")
    if report.api.answering and not report.nodes:
        notes.append(f"the node at {report.api.url} is not on this host: its processes are not checked")
    return tuple(issues), tuple(notes)


def _runner(runner: RunnerProcess) -> str:
    return f"pid={runner.pid} runner={runner.runner_id or '?'} node_pid={runner.node_pid}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def _ports(ports: tuple[int, ...]) -> str:
    return ",".join(map(str, ports)) or "-"


def render(report: Report) -> str:
    """The readable report: one `key=value` line per thing, greppable, the verdict last."""
    out = [f"exo doctor {report.version} on {report.host} ({report.platform})",
           f"nodes: {len(report.nodes)}"]
    state_runners = {r.pid: r for r in report.cluster.runners} if report.cluster else {}
    for node in report.nodes:
        out.append(f"  node pid={node.pid} rss={_mb(node.rss)} ports={_ports(node.ports)} "
                   f"discovery={'on' if node.discovery else 'off'} args={' '.join(node.args) or '-'}")
        for runner in node.runners:
            known = state_runners.get(runner.pid)
            status = f" status={known.status} ring_port={known.port}" if known else ""
            out.append(f"    runner pid={runner.pid} runner={runner.runner_id or '?'}{status} "
                       f"rss={_mb(runner.rss)} ports={_ports(runner.ports)}")
    out.append(f"orphaned runners: {len(report.orphans)}")
    for orphan in report.orphans:
        out.append(f"  orphan {_runner(orphan)} rss={_mb(orphan.rss)} ports={_ports(orphan.ports)} "
                   f"reason={orphan.reason}")
    n_runners = sum(len(node.runners) for node in report.nodes) + len(report.orphans)
    out.append(f"memory: rss={_mb(report.rss_total)} held by {len(report.nodes)} nodes and {n_runners} runners, "
               f"available={_mb(report.memory_available)}")
    api = report.api
    if api.answering and api.health is not None:
        out.append(f"api: url={api.url} health={api.health.get('status')} version={api.health.get('version')} "
                   f"runners_ready={api.health.get('runners_ready')} queue_depth={api.health.get('queue_depth')}"
                   + (f" error={api.error}" if api.error else ""))
    else:
        out.append(f"api: url={api.url} not answering ({api.error})")
    if report.port_holder:
        out.append(f"  port held by {report.port_holder}")
    if cluster := report.cluster:
        master = "this node" if cluster.is_master else (cluster.master_id or "none")
        out.append(f"cluster: node={cluster.node_id} master={master} term={cluster.term} "
                   f"nodes_in_state={len(cluster.nodes)} peers_seen={len(cluster.peers)} "
                   f"kernels={cluster.kernel_path or '?'}")
        if cluster.kernel_reason:
            out.append(f"  kernels: {cluster.kernel_reason}")
        for peer in cluster.peers:
            heard = "never" if peer.seconds_since_heartbeat is None else f"{peer.seconds_since_heartbeat:.1f}s ago"
            out.append(f"  peer node={peer.node_id} address={peer.address or '?'} heard={heard} "
                       f"kernels={peer.kernel_path or '?'}")
    discovery = "on" if any(node.discovery for node in report.nodes) else "off"
    out.append(f"discovery: {discovery}, {_browse(report.browse)}")
    for service in report.browse.services:
        out.append(f"  service node={service.node_id} cluster={service.cluster} version={service.version} "
                   f"address={','.join(service.addresses) or '?'}:{service.port}")
    out.extend(f"note: {note}" for note in report.notes)
    out.extend(f"issue: {issue.kind.value}: {issue.detail}" for issue in report.issues)
    out.append(f"verdict: {report.verdict}")
    return "\n".join(out)


def _browse(browse: Browse) -> str:
    if not browse.ran:
        return "browse skipped (--no-browse)"
    if browse.error:
        return f"browse failed after {browse.seconds:.1f}s: {browse.error}"
    return f"browse saw {len(browse.services)} exo services in {browse.seconds:.1f}s"
