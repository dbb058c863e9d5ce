"""Election, membership and replication of whole clusters of Coordinators on a simulated network."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from simnet import SimNet

from exo.net.messages import CODEC, EventBatch, Snapshot
from exo.shared.apply import TASKS_KEPT, apply_all
from exo.shared.events import InstanceCreated, InstanceDeleted, NodeLeft
from exo.shared.runners import RunnerInfo, RunnerStatus, TaskInfo, TaskKind, TaskStatus
from exo.shared.state import Instance, ShardAssignment, State
from exo.shared.types import InstanceId, NodeId

TIMEOUT = 3.0  # SimNet's peer_timeout


def cluster(*ids: str, **faults: object) -> SimNet:
    net = SimNet(**faults)  # type: ignore[arg-type]
    for node_id in ids:
        net.add(node_id)
    return net


def converged(*ids: str, **faults: object) -> SimNet:
    net = cluster(*ids, **faults)
    assert net.run_until(net.settled, seconds=10) is not None, net.describe()
    return net


def only_master(net: SimNet, among: set[str] | None = None) -> NodeId:
    masters = net.masters({NodeId(n) for n in among} if among is not None else None)
    assert len(masters) == 1, net.describe()
    return masters.pop()


def instance(n: int, node_id: str = "a") -> Instance:
    return Instance(instance_id=InstanceId(f"i{n}"), model_id="tiny", n_layers=4,
                    shards=(ShardAssignment(node_id=NodeId(node_id), rank=0, start=0, end=4),))


def assert_terms_never_fall(net: SimNet) -> None:
    for node_id, terms in net.term_history.items():
        assert terms == sorted(terms), f"{node_id}'s term went back: {terms}"


def test_three_nodes_starting_together_elect_one_master_and_agree() -> None:
    net = cluster("a", "b", "c")
    took = net.run_until(net.settled, seconds=10)
    assert took is not None and took <= TIMEOUT + 2, net.describe()
    master = only_master(net)
    states = [c.state for c in net.nodes.values()]
    assert all(s == states[0] for s in states)
    assert set(states[0].nodes) == {"a", "b", "c"} and states[0].master_id == master
    assert {c.term for c in net.nodes.values()} == {net.nodes[master].term} and net.nodes[master].term >= 1
    assert {c.state.last_event_index for c in net.nodes.values()} == {states[0].last_event_index}


def test_a_dead_masters_place_is_taken_in_a_higher_term_and_it_leaves_the_state() -> None:
    net = converged("a", "b", "c")
    old = only_master(net)
    old_term = net.nodes[old].term
    net.kill(old)
    survivors = set(net.live)

    def replaced() -> bool:
        return net.settled(survivors) and all(old not in c.state.nodes for c in net.live.values())

    took = net.run_until(replaced, seconds=TIMEOUT + 5)
    assert took is not None and took <= TIMEOUT + 3, net.describe()
    new = only_master(net)
    assert new != old and net.nodes[new].term > old_term
    assert set(net.nodes[new].state.nodes) == survivors and net.nodes[new].state.master_id == new
    assert any(isinstance(e, NodeLeft) and e.node_id == old for e in net.nodes[new].log)


def test_a_dead_follower_leaves_every_state_and_the_master_stays() -> None:
    net = converged("a", "b", "c", "d")
    master, term = only_master(net), net.nodes[only_master(net)].term
    net.kill("a")
    took = net.run_until(lambda: net.settled() and all("a" not in c.state.nodes for c in net.live.values()),
                         seconds=TIMEOUT + 3)
    assert took is not None, net.describe()
    assert only_master(net) == master and all(c.term == term and c.state.master_id == master
                                              for c in net.live.values())
    assert {n: c.dropped for n, c in net.live.items()} == {"b": 1, "c": 1, "d": 1}  # exo_peers_dropped_total


def test_a_stable_master_is_kept_when_a_greater_node_joins_and_the_joiner_catches_up() -> None:
    net = converged("a", "b", "c")
    master, term = only_master(net), net.nodes[only_master(net)].term
    joiner = net.add("z")  # the greatest id, and as caught up as anyone would be (nothing applied)
    masters_seen = set()

    def joined() -> bool:
        masters_seen.update((n, c.term) for n, c in net.live.items() if c.is_master)
        return net.settled() and "z" in net.nodes[master].state.nodes

    assert net.run_until(joined, seconds=TIMEOUT + 5) is not None, net.describe()
    net.run(10)
    assert masters_seen == {(master, term)} and only_master(net) == master
    assert joiner.master_id == master and joiner.term == term and joiner.synced_term == term
    assert joiner.state == net.nodes[master].state and set(joiner.state.nodes) == {"a", "b", "c", "z"}


def test_a_healed_partition_keeps_one_master_and_the_losing_side_takes_the_winners_state() -> None:
    net = converged("a", "b", "c")
    assert only_master(net) == "c"  # the greatest id among equally caught-up nodes
    before = net.nodes[NodeId("c")].term
    net.partition({"a", "b"}, {"c"})
    for _ in range(int((TIMEOUT + 5) / 0.5)):
        net.step()
        assert len(net.masters({NodeId("a"), NodeId("b")})) <= 1 and len(net.masters({NodeId("c")})) <= 1
    assert net.settled({"a", "b"}) and net.settled({"c"}), net.describe()
    winner, lone = only_master(net, {"a", "b"}), net.nodes[NodeId("c")]
    assert lone.is_master and set(lone.state.nodes) == {"c"}  # its own term's events: a and b left
    assert net.nodes[winner].term > lone.term == before
    terms_during = max(c.term for c in net.nodes.values())

    net.heal()
    took = net.run_until(lambda: net.settled() and len(net.nodes[winner].state.nodes) == 3, seconds=TIMEOUT + 2)
    assert took is not None, net.describe()
    assert only_master(net) == winner and not lone.is_master
    final = net.nodes[winner].term
    assert final >= terms_during and final > before
    for c in net.nodes.values():  # the lone side's events are gone: everyone holds the winner's log
        assert c.term == final and c.state == net.nodes[winner].state
    assert lone.state.master_id == winner and lone.state.term == final
    assert_terms_never_fall(net)


@pytest.mark.parametrize("seed", range(6))
def test_lost_duplicated_reordered_and_late_messages_still_converge_in_index_order(seed: int) -> None:
    net = converged("a", "b", "c", "d", seed=seed, drop=0.1, duplicate=0.2, reorder=True, delay=0.1)
    master = only_master(net)
    for n in range(40):  # the master keeps creating events while the network misbehaves
        if n % 3 == 0:
            net.emit(master, lambda i, t, n=n: InstanceCreated(index=i, term=t, instance=instance(n)))
        if n % 5 == 4:
            net.emit(master, lambda i, t, n=n: InstanceDeleted(index=i, term=t, instance_id=InstanceId(f"i{n - 1}")))
        net.step()
    assert net.run_until(net.settled, seconds=10) is not None, net.describe()
    assert only_master(net) == master and not net.rewinds, net.rewinds
    log = net.nodes[master].log
    assert [e.index for e in log] == list(range(len(log)))  # one term from the start: the log is complete
    replayed = apply_all(State(), log)
    assert all(c.state == replayed for c in net.nodes.values())
    assert replayed.last_event_index == len(log) - 1 and len(replayed.instances) > 0


def test_messages_from_an_older_term_are_ignored() -> None:
    net = converged("a", "b", "c")
    old = only_master(net)
    old_term = net.nodes[old].term
    net.kill(old)
    assert net.run_until(lambda: net.settled(set(net.live)) and net.masters() != {old}, seconds=10), net.describe()
    new = only_master(net)
    follower = next(c for n, c in net.live.items() if n != new)
    before = (follower.state, follower.term, follower.master_id, follower.synced_term)
    next_index = follower.state.last_event_index + 1
    stale = [
        EventBatch(term=old_term, master_id=old,
                   events=[NodeLeft(index=next_index, term=old_term, node_id=follower.node_id)]),
        Snapshot(term=old_term, master_id=old, state=State(master_id=old, term=old_term)),
        # the current term, but not from its master
        EventBatch(term=follower.term, master_id=old,
                   events=[NodeLeft(index=next_index, term=follower.term, node_id=follower.node_id)]),
        Snapshot(term=follower.term, master_id=old, state=State()),
    ]
    for message in stale:
        assert follower.receive(CODEC.decode(CODEC.encode(message)), net.now) == []
        assert (follower.state, follower.term, follower.master_id, follower.synced_term) == before


def test_a_late_copy_of_an_older_snapshot_does_not_rewind_a_follower() -> None:
    net = converged("a", "b", "c")
    master = net.nodes[only_master(net)]
    older = Snapshot(term=master.term, master_id=master.node_id, state=master.state)
    net.emit(master.node_id, lambda i, t: InstanceCreated(index=i, term=t, instance=instance(1)))
    net.step()
    follower = next(c for c in net.nodes.values() if not c.is_master)
    assert follower.state == master.state and "i1" in follower.state.instances
    follower.receive(CODEC.decode(CODEC.encode(older)), net.now)
    assert follower.state == master.state


def test_a_restarted_node_keeps_its_persisted_term_and_follows_the_new_master() -> None:
    net = converged("a", "b", "c")
    old = only_master(net)
    old_term = net.nodes[old].term
    net.kill(old)
    assert net.run_until(lambda: net.settled(set(net.live)) and net.masters() != {old}, seconds=10), net.describe()
    new, term = only_master(net), net.nodes[only_master(net)].term
    restarted = net.restart(old)
    assert restarted.term == old_term  # not 0: the term was persisted
    took = net.run_until(lambda: net.settled() and len(restarted.state.nodes) == 3, seconds=TIMEOUT + 3)
    assert took is not None, net.describe()
    assert only_master(net) == new and restarted.term == term and net.persisted[old] == term
    assert set(restarted.state.nodes) == {"a", "b", "c"}
    assert_terms_never_fall(net)


def test_a_master_restarting_before_its_peers_notice_is_replaced() -> None:
    net = converged("a", "b", "c")
    old = only_master(net)
    old_term = net.nodes[old].term
    net.restart(old)  # back at once: its heartbeats never stop, but it no longer claims to be master
    took = net.run_until(lambda: net.settled() and net.nodes[old].term > old_term, seconds=3 * TIMEOUT)
    assert took is not None, net.describe()
    assert set(net.nodes[only_master(net)].state.nodes) == {"a", "b", "c"}
    assert_terms_never_fall(net)


def test_a_node_with_a_higher_persisted_term_joins_without_livelock() -> None:
    net = converged("a", "b", "c")
    net.add("d", term=10)
    took = net.run_until(lambda: net.settled() and len(net.nodes[only_master(net)].state.nodes) == 4,
                         seconds=TIMEOUT + 5)
    assert took is not None, net.describe()
    master, term = only_master(net), net.nodes[only_master(net)].term
    assert term > 10
    net.run(15)  # and it stays settled: no new elections
    assert net.settled() and only_master(net) == master and {c.term for c in net.nodes.values()} == {term}
    assert_terms_never_fall(net)


def test_nodes_of_another_cluster_or_an_incompatible_version_are_ignored() -> None:
    net = cluster("a", "b", "c")
    # Both outsiders are older, with higher terms, and hear every broadcast (shared seeds).
    net.add("x", cluster="other", term=5)
    net.add("y", version="0.2.0", term=5)
    net.add("w", version="0.1.7")  # a patch release apart: compatible
    insiders = {"a", "b", "c", "w"}
    assert net.run_until(lambda: net.settled(insiders) and len(net.nodes[NodeId("a")].state.nodes) == 4,
                         seconds=10), net.describe()
    net.run(10)
    assert net.settled(insiders) and net.settled({"x"}) and net.settled({"y"}), net.describe()
    master = only_master(net, insiders)
    assert set(net.nodes[master].state.nodes) == insiders and net.nodes[master].term == 1
    for outsider in ("x", "y"):
        node = net.nodes[NodeId(outsider)]
        assert node.is_master and set(node.state.nodes) == {outsider} and node.term == 6
        assert set(node.peers) == set()


def test_terms_only_grow_on_every_node_through_kills_restarts_partitions_and_faults() -> None:
    net = converged("a", "b", "c", "d", "e", seed=7, drop=0.1, duplicate=0.1, reorder=True, delay=0.05)
    script = [
        (5, lambda: net.kill(only_master(net))),
        (10, lambda: net.partition({"a", "b"}, {"c", "d", "e"})),
        (8, lambda: net.restart(next(iter(net.killed)))),
        (8, lambda: net.heal()),
        (6, lambda: net.partition({"a"}, {"b", "c"}, {"d", "e"})),
        (10, lambda: net.heal()),
    ]
    for seconds, action in script:
        action()
        net.run(seconds)
    assert net.run_until(net.settled, seconds=10) is not None, net.describe()
    assert len(net.nodes[only_master(net)].state.nodes) == 5
    assert_terms_never_fall(net)
    assert all(net.persisted[n] == c.term for n, c in net.nodes.items())


@pytest.mark.parametrize("seed", range(30))
def test_random_faults_always_heal_to_one_master_without_rewinds_or_falling_terms(seed: int) -> None:
    r = random.Random(seed)
    net = SimNet(seed=seed, drop=r.choice([0, 0.1, 0.3]), duplicate=r.choice([0, 0.2, 0.5]), reorder=True,
                 delay=r.choice([0, 0.1, 0.3]))
    ids = "abcde"[: r.randint(2, 5)]
    for node_id in ids:
        net.add(node_id)
    made = 0
    for _ in range(r.randint(5, 15)):
        roll = r.random()
        if roll < 0.15 and len(net.live) > 1:
            net.kill(r.choice(sorted(net.live)))
        elif roll < 0.3 and net.killed:
            net.restart(r.choice(sorted(net.killed)))
        elif roll < 0.45:
            shuffled = r.sample(ids, len(ids))
            cut = r.randint(1, len(ids))
            net.partition(set(shuffled[:cut]), set(shuffled[cut:]))
        elif roll < 0.55:
            net.heal()
        for _ in range(r.randint(1, 20)):
            for master in sorted(net.masters()):
                if r.random() < 0.3:
                    made += 1
                    net.emit(master, lambda i, t, n=made: InstanceCreated(index=i, term=t, instance=instance(n)))
            net.step()
    net.heal()
    for node_id in sorted(net.killed):
        net.restart(node_id)
    took = net.run_until(lambda: net.settled() and len(net.nodes[only_master(net)].state.nodes) == len(ids),
                         seconds=30)
    assert took is not None, net.describe()
    assert not net.rewinds, net.rewinds
    assert_terms_never_fall(net)


# -- workers: runners and tasks reported in heartbeats ---------------------------------------------


def ring(instance_id: str, *node_ids: str) -> Instance:
    return Instance(instance_id=InstanceId(instance_id), model_id="tiny", n_layers=2 * len(node_ids),
                    shards=tuple(ShardAssignment(node_id=NodeId(n), rank=r, start=2 * r, end=2 * r + 2)
                                 for r, n in enumerate(node_ids)))


def runner(instance_id: str, rank: int, node_id: str, status: RunnerStatus = RunnerStatus.IDLE) -> RunnerInfo:
    return RunnerInfo(instance_id=InstanceId(instance_id), rank=rank, node_id=NodeId(node_id), status=status,
                      start=rank, end=rank + 1, host=f"host-{node_id}", port=7000 + rank)


def task(task_id: str, status: TaskStatus = TaskStatus.RUNNING) -> TaskInfo:
    return TaskInfo(task_id=task_id, instance_id=InstanceId("r"), rank=0, kind=TaskKind.CONNECT, status=status)


def with_ring(*ids: str, **faults: object) -> SimNet:
    """A settled cluster whose state holds instance "r" with one rank on each node, in id order."""
    net = converged(*ids, **faults)
    net.emit(only_master(net), lambda i, t: InstanceCreated(index=i, term=t, instance=ring("r", *ids)))
    assert net.run_until(net.settled, seconds=5) is not None, net.describe()
    return net


def report(net: SimNet, node_id: str, *runners: RunnerInfo, tasks: tuple[TaskInfo, ...] = ()) -> None:
    net.nodes[NodeId(node_id)].update_worker(runners, tasks)


def everyone_sees(net: SimNet, check: Callable[[State], bool]) -> bool:
    return net.settled() and all(check(c.state) for c in net.live.values())


def test_runners_reported_by_followers_and_the_master_reach_every_nodes_state() -> None:
    net = with_ring("a", "b", "c")
    assert only_master(net) == "c"
    reports = {"a": runner("r", 0, "a"), "b": runner("r", 1, "b"), "c": runner("r", 2, "c")}
    for node_id, info in reports.items():
        report(net, node_id, info)
    expected = {info.runner_id: info for info in reports.values()}
    took = net.run_until(lambda: everyone_sees(net, lambda s: s.runners == expected), seconds=3)
    assert took is not None and took <= 1.5, net.describe()


@pytest.mark.parametrize("status", [RunnerStatus.CONNECTED, RunnerStatus.READY, RunnerStatus.FAILED])
def test_a_runners_new_status_reaches_every_nodes_state(status: RunnerStatus) -> None:
    net = with_ring("a", "b", "c")
    report(net, "a", runner("r", 0, "a"))
    assert net.run_until(lambda: everyone_sees(net, lambda s: "r.0" in s.runners), seconds=3), net.describe()
    report(net, "a", runner("r", 0, "a", status))
    assert net.run_until(lambda: everyone_sees(net, lambda s: s.runners["r.0"].status == status), seconds=3)


def test_a_runner_its_node_stops_reporting_is_removed_and_the_others_stay() -> None:
    net = with_ring("a", "b", "c")
    report(net, "a", runner("r", 0, "a"))
    report(net, "b", runner("r", 1, "b"))
    assert net.run_until(lambda: everyone_sees(net, lambda s: set(s.runners) == {"r.0", "r.1"}), seconds=3)
    report(net, "a")
    assert net.run_until(lambda: everyone_sees(net, lambda s: set(s.runners) == {"r.1"}), seconds=3), net.describe()


def test_a_runner_of_an_instance_not_in_the_state_never_appears() -> None:
    net = with_ring("a", "b", "c")
    report(net, "a", runner("unknown", 0, "a"), runner("r", 0, "a"))
    assert net.run_until(lambda: everyone_sees(net, lambda s: "r.0" in s.runners), seconds=3), net.describe()
    net.run(3)
    assert all(set(c.state.runners) == {"r.0"} for c in net.nodes.values())


def test_the_runners_of_a_deleted_instance_leave_the_state_even_while_still_reported() -> None:
    net = with_ring("a", "b", "c")
    report(net, "a", runner("r", 0, "a"))
    assert net.run_until(lambda: everyone_sees(net, lambda s: "r.0" in s.runners), seconds=3), net.describe()
    net.emit(only_master(net), lambda i, t: InstanceDeleted(index=i, term=t, instance_id=InstanceId("r")))
    net.run(3)
    assert net.settled() and all(c.state.runners == {} for c in net.nodes.values())


def test_task_records_reported_by_a_follower_reach_every_nodes_state() -> None:
    net = with_ring("a", "b", "c")
    report(net, "a", runner("r", 0, "a"), tasks=(task("t1"), task("t2")))
    assert net.run_until(lambda: everyone_sees(net, lambda s: s.tasks == {"t1": task("t1"), "t2": task("t2")}),
                         seconds=3), net.describe()
    report(net, "a", runner("r", 0, "a"), tasks=(task("t2"), task("t1", TaskStatus.COMPLETE)))
    assert net.run_until(lambda: everyone_sees(net, lambda s: s.tasks["t1"].status == TaskStatus.COMPLETE),
                         seconds=3), net.describe()


def test_a_dead_nodes_runners_leave_with_it() -> None:
    net = with_ring("a", "b", "c")
    report(net, "a", runner("r", 0, "a"))
    report(net, "b", runner("r", 1, "b"))
    assert net.run_until(lambda: everyone_sees(net, lambda s: set(s.runners) == {"r.0", "r.1"}), seconds=3)
    net.kill("a")
    assert net.run_until(lambda: everyone_sees(net, lambda s: set(s.runners) == {"r.1"}), seconds=TIMEOUT + 3)


def test_a_new_master_keeps_the_live_nodes_runners_and_drops_the_dead_masters() -> None:
    net = with_ring("a", "b", "c")
    for rank, node_id in enumerate("abc"):
        report(net, node_id, runner("r", rank, node_id, RunnerStatus.READY))
    assert net.run_until(lambda: everyone_sees(net, lambda s: len(s.runners) == 3), seconds=3), net.describe()
    net.kill(only_master(net))
    report(net, "a", runner("r", 0, "a", RunnerStatus.FAILED))  # while the cluster has no master
    expected = {"r.0": runner("r", 0, "a", RunnerStatus.FAILED), "r.1": runner("r", 1, "b", RunnerStatus.READY)}
    assert net.run_until(lambda: everyone_sees(net, lambda s: s.runners == expected),
                         seconds=TIMEOUT + 5), net.describe()


@pytest.mark.parametrize("seed", range(3))
def test_runner_statuses_converge_through_lost_and_reordered_messages(seed: int) -> None:
    net = with_ring("a", "b", "c", seed=seed, drop=0.2, duplicate=0.2, reorder=True, delay=0.1)
    final = {}
    for status in (RunnerStatus.CONNECTING, RunnerStatus.CONNECTED, RunnerStatus.LOADED, RunnerStatus.READY):
        for rank, node_id in enumerate("abc"):
            report(net, node_id, runner("r", rank, node_id, status))
            final[f"r.{rank}"] = runner("r", rank, node_id, status)
        net.step()
    assert net.run_until(lambda: everyone_sees(net, lambda s: s.runners == final), seconds=10), net.describe()


def test_a_quiet_cluster_with_unchanged_reports_stops_emitting_events() -> None:
    net = with_ring("a", "b", "c")
    report(net, "a", runner("r", 0, "a"), tasks=(task("t1"),))
    report(net, "b", runner("r", 1, "b"))
    assert net.run_until(lambda: everyone_sees(net, lambda s: len(s.runners) == 2 and "t1" in s.tasks), seconds=3)
    index = net.nodes[only_master(net)].state.last_event_index
    net.run(5)
    assert net.nodes[only_master(net)].state.last_event_index == index


def test_more_reported_tasks_than_the_state_keeps_do_not_make_events_forever() -> None:
    net = with_ring("a", "b", "c")
    report(net, "a", tasks=tuple(task(f"a{k}") for k in range(TASKS_KEPT // 2 + 1)))
    report(net, "b", tasks=tuple(task(f"b{k}") for k in range(TASKS_KEPT // 2 + 1)))
    net.run(3)
    index = net.nodes[only_master(net)].state.last_event_index
    net.run(3)
    assert net.nodes[only_master(net)].state.last_event_index == index


def test_a_master_that_says_it_leaves_is_replaced_well_before_its_peers_would_time_out() -> None:
    net = converged("a", "b", "c")
    old = only_master(net)
    net.leave(old)
    survivors = set(net.live)
    took = net.run_until(lambda: net.settled(survivors) and all(old not in c.state.nodes for c in net.live.values()),
                         seconds=TIMEOUT, dt=0.1)
    assert took is not None and took < TIMEOUT / 2, net.describe()
    assert only_master(net) != old
    assert all(c.dropped == 0 for c in net.live.values())  # it said goodbye: not a silent drop
