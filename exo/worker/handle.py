"""A node's hold on one runner process: its lifecycle as one transition table, and its chats' channels.

    Starting ─reported→ Live ⇄ Busy (a lifecycle task in flight)
       │                 │
       ├──── stop ───────┴──→ Stopping ───exited→ Stopped        (removed; never started again)
       ├──── restart ────────→ Restarting ─exited→ BackingOff ─→ Replaced (removed; started anew)
       ├──── rejoin ─────────→ Rejoining ──exited→ Replaced                  └→ GaveUp
       └──── exited (it died on its own) ────────→ BackingOff

A chat's channel is open only while the handle is Live or Busy: leaving them ends every chat with
the reason, and removes its channel, so a frame the runner sends later for it is dropped. An event
a state does not list changes nothing (a lifecycle task's record arriving while the runner stops).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum

import anyio
from anyio.abc import Process

from exo.shared.errors import ExoError, ServiceUnavailable
from exo.shared.runners import Download, RunnerInfo, RunnerStatus, TaskInfo, runner_id
from exo.shared.types import NodeId
from exo.worker.plan import LocalRunner
from exo.worker.runner.messages import Cancel, Generated, RunnerSpec, Task, TaskChanged, pack_frame

log = logging.getLogger(__name__)


class HandleState(StrEnum):
    STARTING = "Starting"      # its process is starting and has not reported yet
    LIVE = "Live"              # it reports; it takes lifecycle tasks and chats as its status allows
    BUSY = "Busy"              # a lifecycle task is in flight
    STOPPING = "Stopping"      # asked to exit for good: its instance is gone, or the node stops
    RESTARTING = "Restarting"  # asked to exit to start again: it failed or hung (counts against its restarts)
    REJOINING = "Rejoining"    # asked to exit to start again in a new ring: not a fault
    BACKING_OFF = "BackingOff"  # exited; starts again after its backoff
    GAVE_UP = "GaveUp"         # exited past its restarts: only a new placement brings it back
    REPLACED = "Replaced"      # exited and removed; the next reconcile starts its successor
    STOPPED = "Stopped"        # exited and removed for good


class HandleEvent(StrEnum):
    REPORTED = "reported"      # its first status arrived
    TASK_SENT = "task_sent"
    TASK_DONE = "task_done"
    STOP = "stop"
    RESTART = "restart"
    REJOIN = "rejoin"
    EXITED = "exited"          # its process is gone, whatever ended it
    BACKED_OFF = "backed_off"
    GIVE_UP = "give_up"


S, E = HandleState, HandleEvent
RUNNING = (S.STARTING, S.LIVE, S.BUSY)          # the process runs and nobody asked it to stop
LEAVING = (S.STOPPING, S.RESTARTING, S.REJOINING)  # asked to exit: deadlines run until it has
GONE = (S.BACKING_OFF, S.GAVE_UP, S.REPLACED, S.STOPPED)  # its process has exited
CHATTING = (S.LIVE, S.BUSY)                     # chats' channels are open

HANDLE_TRANSITIONS: dict[tuple[HandleState, HandleEvent], HandleState] = {
    (S.STARTING, E.REPORTED): S.LIVE,
    (S.LIVE, E.TASK_SENT): S.BUSY,
    (S.BUSY, E.TASK_DONE): S.LIVE,
    **{(s, E.STOP): S.STOPPING for s in (*RUNNING, S.RESTARTING, S.REJOINING)},
    **{(s, E.RESTART): S.RESTARTING for s in RUNNING},
    **{(s, E.REJOIN): S.REJOINING for s in RUNNING},
    **{(s, E.EXITED): S.BACKING_OFF for s in (*RUNNING, S.RESTARTING)},
    (S.REJOINING, E.EXITED): S.REPLACED,
    (S.STOPPING, E.EXITED): S.STOPPED,
    (S.BACKING_OFF, E.BACKED_OFF): S.REPLACED,
    (S.BACKING_OFF, E.GIVE_UP): S.GAVE_UP,
    (S.BACKING_OFF, E.STOP): S.STOPPED,
    (S.GAVE_UP, E.STOP): S.STOPPED,
}


def next_state(state: HandleState, event: HandleEvent) -> HandleState | None:
    """Where `event` takes a handle in `state`, or None if it changes nothing there."""
    return HANDLE_TRANSITIONS.get((state, event))


class ChatChannel:
    """One chat's frames from the runner to the request streaming them, at most `size` of them unread."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.send, self.receive = anyio.create_memory_object_stream[Generated | TaskChanged](max_buffer_size=size)
        self.error: ExoError | None = None  # why the node ended it early, if it did

    def put(self, frame: Generated | TaskChanged) -> bool:
        """Pass a frame on; False if `size` frames are waiting unread already."""
        try:
            self.send.send_nowait(frame)
        except anyio.WouldBlock:
            return False
        return True

    def end(self, error: ExoError | None = None) -> None:
        self.error = self.error or error
        self.send.close()


@dataclass
class RunnerHandle:
    spec: RunnerSpec
    node_id: NodeId
    host: str
    port: int
    status: RunnerStatus = RunnerStatus.IDLE
    error: str | None = None
    process: Process | None = None
    state: HandleState = HandleState.STARTING
    restarts: int = 0
    hosts: tuple[str, ...] | None = None  # the ring it was asked to join
    lifecycle: str | None = None          # the id of the lifecycle task in flight (while Busy)
    download: Download | None = None      # its model's bytes, while and after they come from a peer
    batch: int = 0                        # chats its batch decodes together, as it last said
    last_progress: float = field(default_factory=time.monotonic)
    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    chats: dict[str, ChatChannel] = field(default_factory=dict)
    leaving: anyio.Event = field(default_factory=anyio.Event)  # set on entering a LEAVING state
    exited: anyio.Event = field(default_factory=anyio.Event)   # set on entering a GONE state
    _write_lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def runner_id(self) -> str:
        return runner_id(self.spec.instance_id, self.spec.rank)

    def move(self, event: HandleEvent, why: str = "") -> bool:
        """Apply `event`; whether it changed the state. Leaving Live and Busy ends the chats with `why`."""
        if (to := next_state(self.state, event)) is None:
            return False
        log.debug("runner=%s handle %s -> %s (%s)", self.runner_id, self.state, to, event)
        self.state = to
        if to in LEAVING:
            self.leaving.set()
        if to in GONE:
            self.leaving.set()
            self.exited.set()
        if to not in CHATTING and self.chats:
            error = ServiceUnavailable(f"Runner {self.runner_id} stopped during the request"
                                       f"{f' ({why})' if why else ''}; retry shortly.")
            for chat in self.chats.values():
                chat.end(error)
            self.chats.clear()
        return True

    def open_chat(self, task_id: str, size: int) -> ChatChannel:
        assert self.state in CHATTING, f"runner {self.runner_id} takes no chats while {self.state}"
        chat = self.chats[task_id] = ChatChannel(size)
        return chat

    def close_chat(self, task_id: str, error: ExoError | None = None) -> bool:
        """End a chat's channel and forget it; whether it was still open."""
        if (chat := self.chats.pop(task_id, None)) is None:
            return False
        chat.end(error)
        return True

    @property
    def gave_up(self) -> bool:
        return self.state == HandleState.GAVE_UP

    @property
    def info(self) -> RunnerInfo:
        return RunnerInfo(instance_id=self.spec.instance_id, rank=self.spec.rank, node_id=self.node_id,
                          start=self.spec.start, end=self.spec.end, status=self.status, host=self.host, port=self.port,
                          pid=self.process.pid if self.process else None, error=self.error,
                          restarts=self.restarts, gave_up=self.gave_up, download=self.download, batch=self.batch)

    @property
    def local(self) -> LocalRunner:
        return LocalRunner(self.status, busy=self.state != HandleState.LIVE, hosts=self.hosts)

    async def send(self, message: Task | Cancel) -> None:
        if self.process is None or self.process.stdin is None or self.state in GONE:
            raise ServiceUnavailable(f"Runner {self.runner_id} is not running.")
        async with self._write_lock:
            await self.process.stdin.send(pack_frame(message))
