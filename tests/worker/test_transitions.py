"""The runner's lifecycle table: which task each status takes, and where the runner goes doing it."""

from __future__ import annotations

from itertools import product

import pytest

from exo.shared.runners import RunnerStatus as S
from exo.shared.runners import TaskKind as K
from exo.worker.runner.transitions import TRANSITIONS, InvalidTransition, Transition, may_become, transition

ALLOWED = {
    (S.IDLE, K.CONNECT): Transition(S.CONNECTING, S.CONNECTED, S.FAILED),
    (S.IDLE, K.LOAD): Transition(S.LOADING, S.LOADED, S.FAILED),
    (S.CONNECTED, K.LOAD): Transition(S.LOADING, S.LOADED, S.FAILED),
    (S.LOADED, K.WARMUP): Transition(S.WARMING_UP, S.READY, S.FAILED),
    (S.READY, K.WARMUP): Transition(S.WARMING_UP, S.READY, S.FAILED),
    (S.READY, K.CHAT): Transition(S.RUNNING, S.READY, S.READY),
    (S.RUNNING, K.CHAT): Transition(S.RUNNING, S.READY, S.READY),  # a chat joins the batch
    **{(s, K.SHUTDOWN): Transition(S.SHUTTING_DOWN, S.SHUTDOWN, S.SHUTDOWN)
       for s in S if s not in (S.SHUTTING_DOWN, S.SHUTDOWN)},
}
REFUSED = [pair for pair in product(S, K) if pair not in ALLOWED]


def test_the_table_is_exactly_the_allowed_transitions() -> None:
    assert TRANSITIONS == ALLOWED


@pytest.mark.parametrize(("status", "kind"), list(ALLOWED))
def test_an_allowed_task_gets_its_transition(status: S, kind: K) -> None:
    assert transition(status, kind) == ALLOWED[status, kind]


@pytest.mark.parametrize(("status", "kind"), REFUSED)
def test_any_other_task_is_refused_naming_the_task_and_the_status(status: S, kind: K) -> None:
    with pytest.raises(InvalidTransition) as refused:
        transition(status, kind)
    assert f"a {kind.value} task" in str(refused.value) and f"runner is {status.value}" in str(refused.value)
    assert (refused.value.status, refused.value.kind) == (status, kind)


@pytest.mark.parametrize("path", [
    [(S.IDLE, K.CONNECT, S.CONNECTING, S.CONNECTED), (S.CONNECTED, K.LOAD, S.LOADING, S.LOADED),
     (S.LOADED, K.WARMUP, S.WARMING_UP, S.READY), (S.READY, K.CHAT, S.RUNNING, S.READY)],
    [(S.IDLE, K.LOAD, S.LOADING, S.LOADED), (S.LOADED, K.WARMUP, S.WARMING_UP, S.READY)],  # one rank: no ring
], ids=["ring", "single_rank"])
def test_the_lifecycle_leads_from_idle_to_ready(path: list[tuple[S, K, S, S]]) -> None:
    status = path[0][0]
    for start, kind, during, after in path:
        assert status == start
        step = transition(status, kind)
        assert (step.during, step.after) == (during, after)
        status = step.after
    assert status == S.READY


@pytest.mark.parametrize("status", list(S))
def test_shutdown_is_accepted_from_every_status_but_shutting_down_and_shutdown(status: S) -> None:
    if status in (S.SHUTTING_DOWN, S.SHUTDOWN):
        with pytest.raises(InvalidTransition):
            transition(status, K.SHUTDOWN)
    else:
        assert transition(status, K.SHUTDOWN) == Transition(S.SHUTTING_DOWN, S.SHUTDOWN, S.SHUTDOWN)


@pytest.mark.parametrize(("status", "kind", "left"), [
    (S.READY, K.CHAT, S.READY),  # a failed request leaves the runner serving
    (S.IDLE, K.CONNECT, S.FAILED),
    (S.IDLE, K.LOAD, S.FAILED),
    (S.CONNECTED, K.LOAD, S.FAILED),
    (S.LOADED, K.WARMUP, S.FAILED),
    (S.READY, K.WARMUP, S.FAILED),
])
def test_a_failed_task_leaves_the_runner_in_its_error_status(status: S, kind: K, left: S) -> None:
    assert transition(status, kind).on_error == left


def test_a_failed_runner_only_shuts_down() -> None:
    assert {kind for status, kind in TRANSITIONS if status == S.FAILED} == {K.SHUTDOWN}


@pytest.mark.parametrize(("status", "new", "allowed"), [
    (S.SHUTTING_DOWN, S.READY, False),  # the MLX thread finishing a chat while the reader thread stops it
    (S.SHUTTING_DOWN, S.FAILED, False),
    (S.SHUTTING_DOWN, S.SHUTDOWN, True),
    (S.SHUTDOWN, S.READY, False),
    (S.READY, S.SHUTTING_DOWN, True),
    (S.RUNNING, S.READY, True),
    (S.FAILED, S.SHUTTING_DOWN, True),
])
def test_a_stop_in_progress_is_replaced_only_by_its_end(status: S, new: S, allowed: bool) -> None:
    assert may_become(status, new) is allowed
