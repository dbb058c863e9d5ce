"""Which task a runner may take in which status, and the statuses it passes through doing it.

This table is the runner's whole lifecycle; nothing else moves a runner's status, except a
failure of the runner itself (its ring broke, its process died). A task the table does not allow
fails with `InvalidTransition` and leaves the runner as it was. Once a runner is stopping, no
status but the end of the stop replaces that (`may_become`): the thread that reads the node's
Shutdown and the MLX thread finishing a task both set the status.
"""

from __future__ import annotations

from dataclasses import dataclass

from exo.shared.runners import RunnerStatus as S
from exo.shared.runners import TaskKind as K


class InvalidTransition(Exception):
    def __init__(self, status: S, kind: K) -> None:
        super().__init__(f"a {kind} task cannot run while the runner is {status}")
        self.status, self.kind = status, kind


@dataclass(frozen=True)
class Transition:
    during: S     # while the task runs
    after: S      # when it completes
    on_error: S   # when it raises: a runner that could not connect or load is of no use


TRANSITIONS: dict[tuple[S, K], Transition] = {
    (S.IDLE, K.CONNECT): Transition(S.CONNECTING, S.CONNECTED, S.FAILED),
    (S.IDLE, K.LOAD): Transition(S.LOADING, S.LOADED, S.FAILED),  # an instance of one rank has no ring
    (S.CONNECTED, K.LOAD): Transition(S.LOADING, S.LOADED, S.FAILED),
    (S.LOADED, K.WARMUP): Transition(S.WARMING_UP, S.READY, S.FAILED),
    (S.READY, K.WARMUP): Transition(S.WARMING_UP, S.READY, S.FAILED),
    (S.READY, K.CHAT): Transition(S.RUNNING, S.READY, S.READY),  # a failed request leaves the runner serving
    (S.RUNNING, K.CHAT): Transition(S.RUNNING, S.READY, S.READY),  # it joins the running batch; Ready once all end
    **{(status, K.SHUTDOWN): Transition(S.SHUTTING_DOWN, S.SHUTDOWN, S.SHUTDOWN)
       for status in S if status not in (S.SHUTTING_DOWN, S.SHUTDOWN)},
}


# Statuses only some statuses may follow; any other may follow any status.
ONLY_FOLLOWED_BY: dict[S, tuple[S, ...]] = {
    S.SHUTTING_DOWN: (S.SHUTDOWN,),
    S.SHUTDOWN: (),
}


def may_become(status: S, new: S) -> bool:
    return new in ONLY_FOLLOWED_BY.get(status, (new,))


def transition(status: S, kind: K) -> Transition:
    if (found := TRANSITIONS.get((status, kind))) is None:
        raise InvalidTransition(status, kind)
    return found
