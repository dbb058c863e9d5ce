"""A runner handle's lifecycle table, and how its chats' channels follow it."""

from __future__ import annotations

from itertools import product

import pytest

from exo.shared.errors import ServiceUnavailable
from exo.shared.runners import TaskKind, TaskStatus
from exo.shared.types import InstanceId, NodeId
from exo.worker.handle import CHATTING, GONE, HANDLE_TRANSITIONS, RUNNING, ChatChannel, RunnerHandle, next_state
from exo.worker.handle import HandleEvent as E
from exo.worker.handle import HandleState as S
from exo.worker.runner.messages import RunnerSpec, TaskChanged

ALLOWED = {
    (S.STARTING, E.REPORTED): S.LIVE,
    (S.LIVE, E.TASK_SENT): S.BUSY,
    (S.BUSY, E.TASK_DONE): S.LIVE,
    (S.STARTING, E.STOP): S.STOPPING, (S.LIVE, E.STOP): S.STOPPING, (S.BUSY, E.STOP): S.STOPPING,
    (S.RESTARTING, E.STOP): S.STOPPING, (S.REJOINING, E.STOP): S.STOPPING,
    (S.STARTING, E.RESTART): S.RESTARTING, (S.LIVE, E.RESTART): S.RESTARTING, (S.BUSY, E.RESTART): S.RESTARTING,
    (S.STARTING, E.REJOIN): S.REJOINING, (S.LIVE, E.REJOIN): S.REJOINING, (S.BUSY, E.REJOIN): S.REJOINING,
    (S.STARTING, E.EXITED): S.BACKING_OFF, (S.LIVE, E.EXITED): S.BACKING_OFF, (S.BUSY, E.EXITED): S.BACKING_OFF,
    (S.RESTARTING, E.EXITED): S.BACKING_OFF,
    (S.REJOINING, E.EXITED): S.REPLACED,
    (S.STOPPING, E.EXITED): S.STOPPED,
    (S.BACKING_OFF, E.BACKED_OFF): S.REPLACED,
    (S.BACKING_OFF, E.GIVE_UP): S.GAVE_UP,
    (S.BACKING_OFF, E.STOP): S.STOPPED,
    (S.GAVE_UP, E.STOP): S.STOPPED,
}
IGNORED = [pair for pair in product(S, E) if pair not in ALLOWED]


def handle() -> RunnerHandle:
    spec = RunnerSpec(node_id="a", instance_id=InstanceId("i1"), rank=0, world_size=1, model_path="", start=0,
                      end=4, n_layers=4, dtype="float32")
    return RunnerHandle(spec, NodeId("a"), "127.0.0.1", 1)


def test_the_table_is_exactly_the_allowed_transitions() -> None:
    assert HANDLE_TRANSITIONS == ALLOWED


@pytest.mark.parametrize(("state", "event"), IGNORED)
def test_any_other_event_changes_nothing(state: S, event: E) -> None:
    h = handle()
    h.state = state
    assert next_state(state, event) is None and not h.move(event) and h.state == state


@pytest.mark.parametrize("state", list(S))
def test_every_state_is_reachable_from_starting(state: S) -> None:
    reached, frontier = {S.STARTING}, [S.STARTING]
    while frontier:
        here = frontier.pop()
        for (start, _), to in ALLOWED.items():
            if start == here and to not in reached:
                reached.add(to)
                frontier.append(to)
    assert state in reached


@pytest.mark.parametrize("state", [*GONE])
def test_no_event_brings_an_exited_runner_back(state: S) -> None:
    assert all(ALLOWED.get((state, e)) in (None, *GONE) for e in E)


@pytest.mark.parametrize("state", [*RUNNING, S.RESTARTING, S.REJOINING])
def test_a_runner_asked_to_stop_for_good_is_never_started_again(state: S) -> None:
    h = handle()
    h.state = state
    h.move(E.STOP)
    assert h.state == S.STOPPING and h.leaving.is_set()
    h.move(E.EXITED)
    assert h.state == S.STOPPED and h.exited.is_set()


@pytest.mark.parametrize(("event", "then"), [(E.RESTART, S.BACKING_OFF), (E.REJOIN, S.REPLACED),
                                             (E.EXITED, S.BACKING_OFF)])
def test_a_restart_backs_off_a_rejoin_does_not(event: E, then: S) -> None:
    h = handle()
    h.move(E.REPORTED)
    h.move(event)
    h.move(E.EXITED)
    assert h.state == then


@pytest.mark.parametrize(("state", "event"), [(S.LIVE, E.STOP), (S.LIVE, E.RESTART), (S.BUSY, E.REJOIN),
                                              (S.LIVE, E.EXITED)])
def test_leaving_live_or_busy_ends_and_removes_every_chat_with_the_reason(state: S, event: E) -> None:
    h = handle()
    h.state = state
    chats = [h.open_chat(f"t{i}", size=4) for i in range(3)]
    assert h.move(event, "it hung") and h.state not in CHATTING
    assert not h.chats
    for chat in chats:
        assert isinstance(chat.error, ServiceUnavailable) and "(it hung)" in chat.error.message
    assert not h.close_chat("t0")  # gone already: the runner's later frames for it find nothing


def test_a_chat_channel_holds_at_most_its_size_unread() -> None:
    chat = ChatChannel(size=2)
    frame = TaskChanged(task_id="t", kind=TaskKind.CHAT, status=TaskStatus.RUNNING)
    assert chat.put(frame) and chat.put(frame)
    assert not chat.put(frame)


def test_chats_open_only_while_live_or_busy() -> None:
    h = handle()
    with pytest.raises(AssertionError):
        h.open_chat("t", size=1)
    h.move(E.REPORTED)
    h.open_chat("t", size=1)
    h.move(E.TASK_SENT)
    h.open_chat("u", size=1)
    assert set(h.chats) == {"t", "u"}
