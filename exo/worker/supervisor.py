"""The node's runner supervisor: starts, feeds, watches and stops one process per local shard.

It reconciles the cluster state with its runners through `plan`, relays their statuses and task
records to the cluster, and streams a chat's text from the instance's rank-0 runner. Each runner's
lifecycle is its handle's transition table (exo/worker/handle.py). A runner ends by escalation: its
node asks (Shutdown, then the end of its stdin), then terminates, then kills, each step when the one
before has not ended it within the grace, whether the runner answers or not.

Its watchdog restarts a runner that died, failed, or made no progress on a request for
`watchdog_timeout`, with a backoff that doubles, up to `max_restarts` times; after that the
runner is reported as given up and the master places its instance again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
from anyio.abc import Process
from anyio.abc import TaskStatus as AnyioTaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from exo.engine.generate import Delta
from exo.models.catalog import ModelCatalog
from exo.net.codec import WireError
from exo.shared.errors import ExoError, ModelError, Overloaded, ServiceUnavailable
from exo.shared.generation import GenerationParams
from exo.shared.runners import (
    SERVING,
    Download,
    RunnerInfo,
    RunnerStatus,
    TaskInfo,
    TaskKind,
    TaskStatus,
    new_task_id,
    runner_id,
)
from exo.shared.state import Instance, ShardAssignment, State
from exo.shared.types import CacheDtype, Dtype, InstanceId, NodeId
from exo.worker.handle import CHATTING, GONE, RUNNING, RunnerHandle
from exo.worker.handle import HandleEvent as E
from exo.worker.handle import HandleState as S
from exo.worker.plan import Restart, Send, Spawn, Stop, plan
from exo.worker.profile import free_ports
from exo.worker.runner.messages import (
    HEADER_SIZE,
    PIPE_CODEC,
    BatchChanged,
    Cancel,
    Generated,
    RunnerSpec,
    StatusChanged,
    Task,
    TaskChanged,
    frame_size,
)
from exo.worker.runner.process import command, runner_env

log = logging.getLogger(__name__)

TASKS_REPORTED = 8       # the latest task records of each runner shown in the cluster state
STOP_GRACE_SECONDS = 5.0  # from asking a runner to stop to SIGTERM, and again to SIGKILL
WATCHDOG_PERIOD = 1.0
DONE = (TaskStatus.COMPLETE, TaskStatus.FAILED, TaskStatus.CANCELLED)


@dataclass(frozen=True)
class Limits:
    queue: int = 16                  # requests waiting or running per instance before 503s
    watchdog_timeout: float = 60.0   # seconds without progress on a request before a restart
    max_restarts: int = 3
    restart_backoff: float = 1.0     # before the first restart; doubles with each
    stream_buffer: int = 256         # a chat's pieces left unread by its client before its stream ends


class Supervisor:
    def __init__(self, node_id: NodeId, catalog: ModelCatalog, *, host: str, dtype: Dtype,
                 report: Callable[[tuple[RunnerInfo, ...], tuple[TaskInfo, ...]], None],
                 limits: Limits = Limits(), kv_cache: CacheDtype | None = None) -> None:
        self.node_id, self.catalog, self.host, self.dtype, self._report = node_id, catalog, host, dtype, report
        self.kv_cache = kv_cache
        self.limits = limits
        self.runners: dict[str, RunnerHandle] = {}
        self.restarts = 0  # runners this node's watchdog restarted since it started
        self.give_ups = 0  # runners given up on past their restarts, since it started
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
                    self._leave(self.runners[rid], E.REJOIN, "its ring changed")
                case Send(runner_id=rid, kind=kind, hosts=hosts):
                    handle = self.runners[rid]
                    handle.move(E.TASK_SENT)
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
            handle.move(E.TASK_DONE)
            self._wake.set()

    def _spawn(self, instance: Instance, shard: ShardAssignment) -> None:
        spec = RunnerSpec(node_id=self.node_id, instance_id=instance.instance_id, rank=shard.rank,
                          world_size=len(instance.shards), model_path="", start=shard.start, end=shard.end,
                          n_layers=instance.n_layers, dtype=self.dtype, kv_cache=self.kv_cache,
                          context=instance.context)
        [port] = free_ports(1, self.host)
        handle = RunnerHandle(spec, self.node_id, self.host, port)
        handle.restarts = self._restarts.get(handle.runner_id, 0)
        self.runners[handle.runner_id] = handle
        log.info("runner=%s starting: layers [%d, %d) of %s", handle.runner_id, shard.start, shard.end,
                 instance.model_id)
        self._start(self._supervise, handle, instance.model_id)

    def _stop(self, handle: RunnerHandle, why: str = "its instance is gone") -> None:
        """Stop a runner for good; one that has exited already is forgotten."""
        handle.move(E.STOP, why)
        if handle.state == S.STOPPED:
            self._forget(handle)

    def _leave(self, handle: RunnerHandle, event: E, reason: str) -> None:
        """Stop a runner so that it starts again (see `_reap`); its requests end now, with the reason."""
        if handle.move(event, reason):
            log.warning("runner=%s restarting: %s", handle.runner_id, reason)
            self._publish()

    def _forget(self, handle: RunnerHandle) -> None:
        rid = handle.runner_id
        if self.runners.get(rid) is handle:
            del self.runners[rid]
        if handle.state == S.STOPPED:
            self._restarts.pop(rid, None)
        self._publish()
        self._wake.set()

    # -- the watchdog --------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await anyio.sleep(WATCHDOG_PERIOD)
            now = time.monotonic()
            for handle in list(self.runners.values()):
                if handle.state not in RUNNING:  # a runner asked to stop has its deadlines in `_end_process`
                    continue
                if handle.status == RunnerStatus.FAILED:
                    self._leave(handle, E.RESTART, f"it failed ({handle.error})")
                elif (stalled := self._stalled(handle, now)) is not None:
                    self._leave(handle, E.RESTART, f"no progress for {stalled:.0f}s")

    def _stalled(self, handle: RunnerHandle, now: float) -> float | None:
        """Seconds without progress, if the runner owes some (it has requests, or says it is running or
        stopping) and made none for `watchdog_timeout`."""
        owes = handle.chats or handle.status in (RunnerStatus.RUNNING, RunnerStatus.SHUTTING_DOWN)
        idle = now - handle.last_progress
        return idle if owes and idle > self.limits.watchdog_timeout else None

    def idle_for(self, now: float) -> float:
        """The longest a runner that owes progress (it has requests, or says it is running) has made none."""
        return max((now - h.last_progress for h in self.runners.values()
                    if h.chats or h.status == RunnerStatus.RUNNING), default=0.0)

    def stall(self, now: float) -> str | None:
        """Why this node is not healthy, if a runner with work made no progress past the watchdog's
        deadline (it is being restarted, or cannot be)."""
        for handle in self.runners.values():
            if (handle.chats or handle.status == RunnerStatus.RUNNING) and \
                    (idle := now - handle.last_progress) > self.limits.watchdog_timeout:
                return (f"runner {handle.runner_id} made no progress on a request for {idle:.0f}s, past the "
                        f"watchdog's {self.limits.watchdog_timeout:g}s (its handle is {handle.state})")
        return None

    async def _respawn(self, handle: RunnerHandle) -> None:
        """After a runner that failed or hung has exited: wait out its backoff, then let the next
        reconcile start it anew; or, past its restarts, give up on it."""
        rid = handle.runner_id
        attempt = self._restarts.get(rid, 0)
        if attempt >= self.limits.max_restarts:
            handle.move(E.GIVE_UP)
            self.give_ups += 1
            log.error("runner=%s gave up after %d restarts: %s", rid, attempt, handle.error)
            self._publish()
            return
        await anyio.sleep(self.limits.restart_backoff * 2**attempt)
        if handle.move(E.BACKED_OFF):  # not stopped meanwhile
            self._restarts[rid] = attempt + 1
            self.restarts += 1
            self._forget(handle)

    # -- one runner process --------------------------------------------------------------------

    async def _supervise(self, handle: RunnerHandle, model_id: str) -> None:
        """Run one runner process from start to exit, whatever ends it."""
        try:
            spec = handle.spec
            path = await anyio.to_thread.run_sync(functools.partial(
                self.catalog.path, model_id, layers=(spec.start, spec.end), progress=self._download_progress(handle)))
            handle.spec = handle.spec.model_copy(update={"model_path": str(path)})
            if handle.leaving.is_set():
                return  # stopped before it started
            handle.process = await anyio.open_process(
                command(handle.spec.model_dump_json(), os.getpid()),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=runner_env(os.environ),
                start_new_session=True)  # a terminal's Ctrl-C is for the node, which stops its runners in order
            log.info("runner=%s pid=%d", handle.runner_id, handle.process.pid)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._end_when_leaving, handle, handle.process)
                await self._read(handle)
                tg.cancel_scope.cancel()  # its stdout closed: `_reap` sees the process out
        except anyio.get_cancelled_exc_class():
            handle.move(E.STOP, "the node is stopping")
            raise
        except ExoError as e:
            handle.status, handle.error = RunnerStatus.FAILED, e.message
            log.error("runner=%s could not start: %s", handle.runner_id, e.message)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reap(handle)

    def _download_progress(self, handle: RunnerHandle) -> Callable[[int, int, str], None]:
        """What a fetch of the runner's layers from a peer calls, in its thread, as pieces arrive: the
        runner's download in the state, sent on at most every half second and when it completes."""
        last = 0.0

        def progress(done: int, total: int, holder: NodeId) -> None:
            nonlocal last
            handle.download = Download(from_node=holder, bytes_done=done, bytes_total=total)
            if done >= total or time.monotonic() - last >= 0.5:
                last = time.monotonic()
                anyio.from_thread.run_sync(self._publish)

        return progress

    async def _end_when_leaving(self, handle: RunnerHandle, process: Process) -> None:
        await handle.leaving.wait()
        await self._end_process(handle, process, Task(task_id=new_task_id(), kind=TaskKind.SHUTDOWN))

    async def _end_process(self, handle: RunnerHandle, process: Process, ask: Task | None = None) -> None:
        """Ask the runner to exit (`ask`, then the end of its stdin), then terminate it, then kill it:
        each step follows when the one before has not ended the process within the grace, whatever the
        runner says or does not say (a runner stopped with SIGSTOP reads nothing)."""
        with anyio.move_on_after(self._grace):
            with contextlib.suppress(ExoError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                if ask is not None:
                    await handle.send(ask)
                if process.stdin is not None:
                    await process.stdin.aclose()
            await process.wait()
            return
        for escalate in (process.terminate, process.kill):
            log.warning("runner=%s pid=%d did not exit within %.1fs: %s", handle.runner_id, process.pid, self._grace,
                        escalate.__name__)
            with contextlib.suppress(ProcessLookupError):
                escalate()
            with anyio.move_on_after(self._grace if escalate == process.terminate else math.inf):
                await process.wait()
                return

    async def _read(self, handle: RunnerHandle) -> None:
        assert handle.process is not None and handle.process.stdout is not None
        stream = BufferedByteReceiveStream(handle.process.stdout)
        while True:
            try:
                frame = await stream.receive_exactly(frame_size(await stream.receive_exactly(HEADER_SIZE)))
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
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
                handle.status, handle.error = status, error
                handle.move(E.REPORTED)
                self._publish()
                self._wake.set()  # its next lifecycle task may be due
            case TaskChanged(task_id=task_id, kind=kind, status=status, error=error):
                spec = handle.spec
                handle.tasks.pop(task_id, None)
                handle.tasks[task_id] = TaskInfo(task_id=task_id, instance_id=spec.instance_id, rank=spec.rank,
                                                 kind=kind, status=status, error=error)
                while len(handle.tasks) > TASKS_REPORTED:
                    del handle.tasks[next(iter(handle.tasks))]
                if status in DONE and task_id == handle.lifecycle:
                    handle.lifecycle = None
                    handle.move(E.TASK_DONE)
                    self._wake.set()
                self._deliver(handle, message)
                self._publish()
            case Generated():
                self._deliver(handle, message)
            case BatchChanged(size=size):
                handle.batch = size
                self._publish()

    def _deliver(self, handle: RunnerHandle, frame: Generated | TaskChanged) -> None:
        """Pass a frame to its chat; a chat that ended already (its client left, its runner is stopping)
        drops it, and one whose client left `stream_buffer` frames unread is ended."""
        if (chat := handle.chats.get(frame.task_id)) is None:
            log.debug("runner=%s task=%s %s for no open chat: dropped", handle.runner_id, frame.task_id,
                      type(frame).__name__)
            return
        if not chat.put(frame):
            log.warning("runner=%s task=%s the client left %d pieces unread: ending its stream", handle.runner_id,
                        frame.task_id, chat.size)
            handle.close_chat(frame.task_id, ServiceUnavailable(
                f"The client read the stream too slowly: {chat.size} pieces were waiting unread, so the request "
                "was cancelled. Read the stream as it comes, or ask without streaming."))
            self._start(self._cancel, handle, frame.task_id)

    def end_chats(self, why: str) -> None:
        """End every chat now, each stream with `why` as its error event, and tell the runners to cancel."""
        for handle in self.runners.values():
            for task_id in list(handle.chats):
                handle.close_chat(task_id, ServiceUnavailable(why))
                self._start(self._cancel, handle, task_id)

    async def _cancel(self, handle: RunnerHandle, task_id: str) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            with contextlib.suppress(ExoError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await handle.send(Cancel(task_id=task_id))

    async def _reap(self, handle: RunnerHandle) -> None:
        """Make sure the process is gone, then move the handle on: forgotten, replaced, or restarted."""
        process = handle.process
        if process is not None:
            if process.returncode is None:
                await self._end_process(handle, process)
            if process.stdout is not None:
                with anyio.move_on_after(self._grace):
                    await process.stdout.aclose()
            code = process.returncode
            if handle.state == S.STOPPING:
                handle.status = RunnerStatus.SHUTDOWN
            elif handle.status not in (RunnerStatus.FAILED, RunnerStatus.SHUTDOWN):  # not the Running it last said
                handle.status, handle.error = RunnerStatus.FAILED, f"runner process exited with code {code}"
                if handle.state in RUNNING:  # it died on its own
                    log.error("runner=%s %s", handle.runner_id, handle.error)
        handle.move(E.EXITED, "its process exited")
        if handle.state in (S.STOPPED, S.REPLACED):
            self._forget(handle)
        else:
            self._publish()
            self._wake.set()
            if handle.state == S.BACKING_OFF and self._tg is not None:
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
        live = [h for h in self.runners.values() if h.state not in GONE]
        for handle in list(self.runners.values()):
            self._stop(handle, "the node is stopping")
        with anyio.move_on_after(self._grace):
            for handle in live:
                await handle.exited.wait()

    def serving(self) -> dict[str, RunnerStatus]:
        """The statuses of this node's runners that take chats now: ahead of the cluster state, which
        hears of them through the master; one stopping or not yet started is left out."""
        return {rid: h.status for rid, h in self.runners.items() if h.state in CHATTING}

    def admit(self, instance_id: InstanceId) -> RunnerHandle:
        """The instance's rank-0 runner, if it takes one more request now; else the reason it does not.
        This node's own handle decides, not the cluster state (a runner's status reaches that later)."""
        handle = self.head(instance_id)
        if handle is None or handle.state not in CHATTING or handle.status not in SERVING:
            raise ServiceUnavailable(f"Instance {instance_id} is not ready on this node; retry shortly.")
        if len(handle.chats) >= self.limits.queue:
            raise Overloaded(f"Instance {instance_id} has {len(handle.chats)} requests waiting, its limit; "
                             "retry shortly.")
        return handle

    async def chat(self, instance_id: InstanceId, prompt: list[int], params: GenerationParams) -> AsyncIterator[Delta]:
        """Stream a chat's text from the instance's rank-0 runner, which must be on this node."""
        handle = self.admit(instance_id)
        task = Task(task_id=new_task_id(), kind=TaskKind.CHAT, prompt=tuple(prompt), params=params)
        chat = handle.open_chat(task.task_id, self.limits.stream_buffer)
        finished = False
        try:
            try:
                await handle.send(task)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise ServiceUnavailable(f"Runner {handle.runner_id} stopped; retry shortly.") from None
            async with chat.receive:
                async for item in chat.receive:
                    if isinstance(item, Generated):
                        yield Delta(item.text, item.n_tokens, item.finish_reason, item.cached_tokens,
                                    item.stop_sequence)
                        finished = item.finish_reason is not None
                    elif item.status == TaskStatus.FAILED:
                        finished = True
                        if handle.status not in SERVING:  # the runner broke (its ring, say): a retry may work
                            raise ServiceUnavailable(f"Runner {handle.runner_id} is {handle.status} and could not "
                                                     f"finish the request ({item.error}); retry shortly.")
                        raise ModelError(f"The request failed in runner {handle.runner_id}: {item.error}")
                    elif item.status == TaskStatus.CANCELLED:
                        finished = True
                        raise ServiceUnavailable(f"Runner {handle.runner_id} cancelled the request (it is "
                                                 f"{handle.status}); retry shortly.")
                    elif item.status == TaskStatus.COMPLETE:
                        finished = True
                    if finished:
                        return
            raise chat.error or ServiceUnavailable(f"Runner {handle.runner_id} stopped during the request; "
                                                   "retry shortly.")
        finally:
            if handle.close_chat(task.task_id) and not finished:  # still open: its client left
                await self._cancel(handle, task.task_id)

    async def run_task(self, rid: str, kind: TaskKind) -> str:
        """Give a runner a task as an operator asks; the runner checks it like any other."""
        if (handle := self.runners.get(rid)) is None:
            raise ServiceUnavailable(f"No runner {rid} on this node.")
        task = Task(task_id=new_task_id(), kind=kind)
        await handle.send(task)
        return task.task_id
