"""The node's runner supervisor: starts, feeds, watches and stops one process per local shard.

It reconciles the cluster state with its runners through `plan`, relays their statuses and task
records to the cluster, and streams a chat's text from the instance's rank-0 runner. A runner
ends by escalation: its node asks (Shutdown, or the end of its stdin), then terminates, then kills.

Its watchdog restarts a runner that died, failed, or made no progress on a request for
`watchdog_timeout`, with a backoff that doubles, up to `max_restarts` times; after that the
runner is reported as given up and the master places its instance again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import Process
from anyio.abc import TaskStatus as AnyioTaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

from exo.engine.generate import Delta, GenerationParams
from exo.models.catalog import ModelCatalog
from exo.net.codec import WireError
from exo.shared.errors import ExoError, ModelError, Overloaded, ServiceUnavailable
from exo.shared.runners import (
    SERVING,
    RunnerInfo,
    RunnerStatus,
    TaskInfo,
    TaskKind,
    TaskStatus,
    new_task_id,
    runner_id,
)
from exo.shared.state import Instance, ShardAssignment, State
from exo.shared.types import Dtype, InstanceId, NodeId
from exo.worker.plan import LocalRunner, Restart, Send, Spawn, Stop, plan
from exo.worker.profile import free_ports
from exo.worker.runner.messages import (
    HEADER_SIZE,
    PIPE_CODEC,
    Cancel,
    Generated,
    RunnerSpec,
    SamplingParams,
    StatusChanged,
    Task,
    TaskChanged,
    frame_size,
    pack_frame,
)
from exo.worker.runner.process import command, runner_env

log = logging.getLogger(__name__)

TASKS_REPORTED = 8       # the latest task records of each runner shown in the cluster state
STOP_GRACE_SECONDS = 5.0  # from asking a runner to stop to SIGTERM, and again to SIGKILL
WATCHDOG_PERIOD = 1.0


@dataclass(frozen=True)
class Limits:
    queue: int = 16                  # requests waiting or running per instance before 503s
    watchdog_timeout: float = 60.0   # seconds without progress on a request before a restart
    max_restarts: int = 3
    restart_backoff: float = 1.0     # before the first restart; doubles with each


@dataclass
class RunnerHandle:
    spec: RunnerSpec
    node_id: NodeId
    host: str
    port: int
    status: RunnerStatus = RunnerStatus.IDLE
    error: str | None = None
    process: Process | None = None
    started: bool = False           # the runner reported its first status
    stopping: bool = False
    replace: bool = False           # stopping to be started again (restarts count when `counted`)
    counted: bool = True
    restarts: int = 0
    gave_up: bool = False
    hosts: tuple[str, ...] | None = None  # the ring it was asked to join
    lifecycle: str | None = None    # the lifecycle task in flight
    last_progress: float = field(default_factory=time.monotonic)
    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    chats: dict[str, MemoryObjectSendStream[Generated | TaskChanged]] = field(default_factory=dict)
    exited: anyio.Event = field(default_factory=anyio.Event)
    _write_lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def runner_id(self) -> str:
        return runner_id(self.spec.instance_id, self.spec.rank)

    @property
    def info(self) -> RunnerInfo:
        return RunnerInfo(instance_id=self.spec.instance_id, rank=self.spec.rank, node_id=self.node_id,
                          start=self.spec.start, end=self.spec.end, status=self.status, host=self.host, port=self.port,
                          pid=self.process.pid if self.process else None, error=self.error,
                          restarts=self.restarts, gave_up=self.gave_up)

    @property
    def local(self) -> LocalRunner:
        dead = self.exited.is_set()
        return LocalRunner(self.status, busy=dead or self.stopping or not self.started or self.lifecycle is not None,
                           hosts=self.hosts)

    async def send(self, message: Task | Cancel) -> None:
        if self.process is None or self.process.stdin is None or self.exited.is_set():
            raise ServiceUnavailable(f"Runner {self.runner_id} is not running.")
        async with self._write_lock:
            await self.process.stdin.send(pack_frame(message))


class Supervisor:
    def __init__(self, node_id: NodeId, catalog: ModelCatalog, *, host: str, dtype: Dtype,
                 report: Callable[[tuple[RunnerInfo, ...], tuple[TaskInfo, ...]], None],
                 limits: Limits = Limits()) -> None:
        self.node_id, self.catalog, self.host, self.dtype, self._report = node_id, catalog, host, dtype, report
        self.limits = limits
        self.runners: dict[str, RunnerHandle] = {}
        self.restarts = 0  # runners this node's watchdog restarted since it started
        self._restarts: dict[str, int] = {}  # counted restarts per runner id
        self._grace = STOP_GRACE_SECONDS
        self.state = State()
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._watch)
                task_status.started()
                while True:
                    self._reconcile()
                    await self._wake.wait()
                    self._wake = anyio.Event()
        finally:
            self._tg = None

    def update(self, state: State) -> None:
        """The cluster state changed: reconcile."""
        self.state = state
        self._wake.set()

    def _reconcile(self) -> None:
        local = {rid: handle.local for rid, handle in self.runners.items()}
        for action in plan(self.node_id, self.state, local):
            match action:
                case Spawn(instance=instance, shard=shard):
                    self._spawn(instance, shard)
                case Stop(runner_id=rid):
                    self._stop(self.runners[rid])
                case Restart(runner_id=rid):
                    self._restart(self.runners[rid], "its ring changed", counted=False)
                case Send(runner_id=rid, kind=kind, hosts=hosts):
                    handle = self.runners[rid]
                    handle.lifecycle = new_task_id()
                    if kind == TaskKind.CONNECT:
                        handle.hosts = hosts
                    self._start(self._send_lifecycle, handle, Task(task_id=handle.lifecycle, kind=kind, hosts=hosts))

    def _start(self, func: Callable[..., object], *args: object) -> None:
        assert self._tg is not None, "the supervisor is not running"
        self._tg.start_soon(func, *args)  # type: ignore[arg-type]

    async def _send_lifecycle(self, handle: RunnerHandle, task: Task) -> None:
        try:
            await handle.send(task)
        except (ServiceUnavailable, anyio.BrokenResourceError, anyio.ClosedResourceError):
            handle.lifecycle = None
            self._wake.set()

    def _spawn(self, instance: Instance, shard: ShardAssignment) -> None:
        spec = RunnerSpec(node_id=self.node_id, instance_id=instance.instance_id, rank=shard.rank,
                          world_size=len(instance.shards), model_path="", start=shard.start, end=shard.end,
                          n_layers=instance.n_layers, dtype=self.dtype)
        [port] = free_ports(1, self.host)
        handle = RunnerHandle(spec, self.node_id, self.host, port)
        handle.restarts = self._restarts.get(handle.runner_id, 0)
        self.runners[handle.runner_id] = handle
        log.info("runner=%s starting: layers [%d, %d) of %s", handle.runner_id, shard.start, shard.end,
                 instance.model_id)
        self._start(self._supervise, handle, instance.model_id)

    def _stop(self, handle: RunnerHandle) -> None:
        handle.replace = False  # its instance is gone: nothing to restart
        if handle.exited.is_set():
            del self.runners[handle.runner_id]
            self._restarts.pop(handle.runner_id, None)
            self._publish()
        elif not handle.stopping:
            self._shut_down(handle)

    def _shut_down(self, handle: RunnerHandle) -> None:
        """Ask a runner to exit. Its requests end now, with an error: a runner blocked in a ring whose
        peer is cut off exits only after its MLX thread's grace, and Shutdown cancels them anyway."""
        handle.stopping = True
        for chat in handle.chats.values():
            chat.close()
        self._start(self._send_lifecycle, handle, Task(task_id=new_task_id(), kind=TaskKind.SHUTDOWN))

    # -- the watchdog --------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await anyio.sleep(WATCHDOG_PERIOD)
            now = time.monotonic()
            for handle in list(self.runners.values()):
                if handle.stopping or handle.exited.is_set():
                    continue
                if handle.status == RunnerStatus.FAILED:
                    self._restart(handle, f"it failed ({handle.error})")
                elif (handle.chats or handle.status == RunnerStatus.RUNNING) and \
                        now - handle.last_progress > self.limits.watchdog_timeout:
                    self._restart(handle, f"no progress for {now - handle.last_progress:.0f}s")

    def _restart(self, handle: RunnerHandle, reason: str, *, counted: bool = True) -> None:
        """Stop a runner so that it starts again; its exit (see `_reap`) schedules the new one."""
        if handle.stopping:
            return
        log.warning("runner=%s restarting: %s", handle.runner_id, reason)
        handle.replace, handle.counted = True, counted
        self._shut_down(handle)

    async def _respawn(self, handle: RunnerHandle) -> None:
        """After a runner that should run again has exited: wait out its backoff, then let the next
        reconcile start it anew; or, past its restarts, give up on it."""
        rid = handle.runner_id
        if handle.counted:
            attempt = self._restarts.get(rid, 0)
            if attempt >= self.limits.max_restarts:
                handle.gave_up = True
                log.error("runner=%s gave up after %d restarts: %s", rid, attempt, handle.error)
                self._publish()
                return
            await anyio.sleep(self.limits.restart_backoff * 2**attempt)
            self._restarts[rid] = attempt + 1
        if self.runners.get(rid) is handle:
            self.restarts += handle.counted  # a ring re-forming around a restarted neighbour is not a fault here
            del self.runners[rid]
            self._wake.set()

    async def _supervise(self, handle: RunnerHandle, model_id: str) -> None:
        """Run one runner process from start to exit, whatever ends it."""
        try:
            path = await anyio.to_thread.run_sync(self.catalog.path, model_id)
            handle.spec = handle.spec.model_copy(update={"model_path": str(path)})
            handle.process = await anyio.open_process(
                command(handle.spec.model_dump_json(), os.getpid()),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=runner_env(os.environ),
                start_new_session=True)  # a terminal's Ctrl-C is for the node, which stops its runners in order
            log.info("runner=%s pid=%d", handle.runner_id, handle.process.pid)
            await self._read(handle)
        except anyio.get_cancelled_exc_class():
            handle.stopping, handle.replace = True, False  # the node is stopping
            raise
        except ExoError as e:
            handle.status, handle.error = RunnerStatus.FAILED, e.message
            log.error("runner=%s could not start: %s", handle.runner_id, e.message)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reap(handle)

    async def _read(self, handle: RunnerHandle) -> None:
        assert handle.process is not None and handle.process.stdout is not None
        stream = BufferedByteReceiveStream(handle.process.stdout)
        while True:
            try:
                frame = await stream.receive_exactly(frame_size(await stream.receive_exactly(HEADER_SIZE)))
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            try:
                message = PIPE_CODEC.decode(frame)
            except WireError as e:
                log.error("runner=%s sent a malformed frame (%s): stopping it", handle.runner_id, e)
                return
            handle.last_progress = time.monotonic()
            self._on_message(handle, message)

    def _on_message(self, handle: RunnerHandle, message: object) -> None:
        match message:
            case StatusChanged(status=status, error=error):
                handle.started, handle.status, handle.error = True, status, error
                self._publish()
                self._wake.set()  # its next lifecycle task may be due
            case TaskChanged(task_id=task_id, kind=kind, status=status, error=error):
                spec = handle.spec
                handle.tasks.pop(task_id, None)
                handle.tasks[task_id] = TaskInfo(task_id=task_id, instance_id=spec.instance_id, rank=spec.rank,
                                                 kind=kind, status=status, error=error)
                while len(handle.tasks) > TASKS_REPORTED:
                    del handle.tasks[next(iter(handle.tasks))]
                if status in (TaskStatus.COMPLETE, TaskStatus.FAILED) and task_id == handle.lifecycle:
                    handle.lifecycle = None
                    self._wake.set()
                if (chat := handle.chats.get(task_id)) is not None:
                    chat.send_nowait(message)
                self._publish()
            case Generated(task_id=task_id):
                if (chat := handle.chats.get(task_id)) is not None:
                    chat.send_nowait(message)

    async def _reap(self, handle: RunnerHandle) -> None:
        """Make sure the process is gone: ask by closing its stdin, then SIGTERM, then SIGKILL."""
        process = handle.process
        if process is not None:
            if process.stdin is not None:
                await process.stdin.aclose()
            for escalate in (process.terminate, process.kill):
                with anyio.move_on_after(self._grace):
                    await process.wait()
                    break
                log.warning("runner=%s pid=%d did not exit: %s", handle.runner_id, process.pid, escalate.__name__)
                escalate()
            else:
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()
            code = process.returncode
            if not handle.stopping and handle.status not in (RunnerStatus.FAILED, RunnerStatus.SHUTDOWN):
                handle.status, handle.error = RunnerStatus.FAILED, f"runner process exited with code {code}"
                log.error("runner=%s %s", handle.runner_id, handle.error)
            elif handle.stopping and not handle.replace:
                handle.status = RunnerStatus.SHUTDOWN
        if not handle.stopping:  # it died on its own
            handle.replace = True
        handle.exited.set()
        for chat in handle.chats.values():
            chat.close()
        self._publish()
        self._wake.set()
        if handle.replace and self._tg is not None:
            self._tg.start_soon(self._respawn, handle)

    def _publish(self) -> None:
        runners = tuple(h.info for h in self.runners.values())
        tasks = tuple(t for h in self.runners.values() for t in h.tasks.values())
        self._report(runners, tasks)

    # -- chats ---------------------------------------------------------------------------------

    def head(self, instance_id: InstanceId) -> RunnerHandle | None:
        return self.runners.get(runner_id(instance_id, 0))

    def queue_depth(self) -> int:
        return sum(len(h.chats) for h in self.runners.values())

    def queues(self) -> dict[str, int]:
        """Requests waiting or running per instance whose rank 0 is here."""
        return {h.spec.instance_id: len(h.chats) for h in self.runners.values() if h.spec.rank == 0}

    async def stop(self, timeout: float) -> None:
        """Ask every runner to stop and give them a third of `timeout` to do it; the rest of it goes
        to SIGTERM and then SIGKILL when the supervisor's task group is cancelled after this."""
        self._grace = timeout / 3
        live = [h for h in self.runners.values() if not h.exited.is_set()]
        for handle in live:
            self._stop(handle)
        with anyio.move_on_after(self._grace):
            for handle in live:
                await handle.exited.wait()

    def admit(self, instance_id: InstanceId) -> RunnerHandle:
        """The instance's rank-0 runner, if it takes one more request now; else the reason it does not."""
        handle = self.head(instance_id)
        if handle is None or handle.status not in SERVING or handle.stopping:
            raise ServiceUnavailable(f"Instance {instance_id} is not ready on this node; retry shortly.")
        if len(handle.chats) >= self.limits.queue:
            raise Overloaded(f"Instance {instance_id} has {len(handle.chats)} requests waiting, its limit; "
                             "retry shortly.")
        return handle

    async def chat(self, instance_id: InstanceId, prompt: list[int], params: GenerationParams) -> AsyncIterator[Delta]:
        """Stream a chat's text from the instance's rank-0 runner, which must be on this node."""
        handle = self.admit(instance_id)
        task = Task(task_id=new_task_id(), kind=TaskKind.CHAT, prompt=tuple(prompt),
                    params=SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                          top_p=params.top_p, seed=params.seed, stop=params.stop))
        send, receive = anyio.create_memory_object_stream[Generated | TaskChanged](max_buffer_size=1 << 16)
        handle.chats[task.task_id] = send
        finished = False
        try:
            await handle.send(task)
            async with receive:
                async for item in receive:
                    if isinstance(item, Generated):
                        yield Delta(item.text, item.n_tokens, item.finish_reason)
                        finished = item.finish_reason is not None
                    elif item.status == TaskStatus.FAILED:
                        finished = True
                        if handle.status not in SERVING:  # the runner broke (its ring, say): a retry may work
                            raise ServiceUnavailable(f"Runner {handle.runner_id} is {handle.status} and could not "
                                                     f"finish the request ({item.error}); retry shortly.")
                        raise ModelError(f"The request failed in runner {handle.runner_id}: {item.error}")
                    elif item.status == TaskStatus.COMPLETE:
                        finished = True
                    if finished:
                        return
            raise ServiceUnavailable(f"Runner {handle.runner_id} stopped during the request; retry shortly.")
        finally:
            handle.chats.pop(task.task_id, None)
            if not finished and not handle.exited.is_set():
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    try:
                        await handle.send(Cancel(task_id=task.task_id))
                    except (ExoError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass

    async def run_task(self, rid: str, kind: TaskKind) -> str:
        """Give a runner a task as an operator asks; the runner checks it like any other."""
        if (handle := self.runners.get(rid)) is None:
            raise ServiceUnavailable(f"No runner {rid} on this node.")
        task = Task(task_id=new_task_id(), kind=kind)
        await handle.send(task)
        return task.task_id
