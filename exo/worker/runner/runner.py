"""The runner process: one shard of one instance, driven by its node over stdin and stdout.

The main thread reads the node's messages; one worker thread owns MLX and takes tasks in order.
A task is checked against the transition table when its turn comes, so a task that does not
fit, or that raises, fails alone: the runner reports it and goes on serving. Rank 0 takes the
chats and drives the ring; the other ranks serve the ring between tasks.

An instance of one rank decodes its chats together (exo.engine.batch): a chat joins the running
batch between rounds and leaves it when it ends or is cancelled; other tasks wait for the batch
to empty.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
from collections import deque
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO

from exo.engine.batch import Batch
from exo.engine.cache import KVCache
from exo.engine.generate import Detokenizer, LocalHead, detokenize
from exo.engine.loading import LoadedModel, load
from exo.engine.pipeline import PipelineHead, Ring, leave, serve, write_hostfile
from exo.engine.prefix import PrefixCache
from exo.shared.generation import GenerationParams
from exo.shared.runners import RunnerStatus, TaskKind, TaskStatus
from exo.worker.runner.messages import (
    BatchChanged,
    Cancel,
    Generated,
    RunnerSpec,
    StatusChanged,
    Task,
    TaskChanged,
    read_frame,
    write_frame,
)
from exo.worker.runner.transitions import InvalidTransition, Transition, may_become, transition

log = logging.getLogger(__name__)

WARMUP_PROMPT = (1, 2, 3, 4)


@dataclass(eq=False)
class _Chat:
    """A chat in the batch: its task, its transition's statuses and its text so far."""

    task: Task
    step: Transition
    text: Detokenizer


class Runner:
    def __init__(self, spec: RunnerSpec, out: BinaryIO) -> None:
        self.spec, self.out = spec, out
        self.status = RunnerStatus.IDLE
        self.ring: Ring | None = None
        self.loaded: LoadedModel | None = None
        self.head: PipelineHead | LocalHead | None = None  # rank 0's, once loaded
        self.batch: Batch | None = None  # rank 0's of an instance of one rank, once loaded
        self._chats: dict[str, _Chat] = {}  # the batch's, by task id
        self._deferred: deque[Task] = deque()  # tasks other than chats taken while the batch ran
        self._batch_said = 0  # the batch's size as last told to the node
        self._prefix_parts: dict[int, list[KVCache]] = {}  # another rank's parts of rank 0's prefix entries
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._task_arrived = threading.Event()  # ends a follower's ring service so the task gets its turn
        self._cancelled: set[str] = set()
        self._active: str | None = None
        self._ring_closed = False
        self._write_lock = threading.Lock()
        self._status_lock = threading.Lock()  # the reader thread and the MLX thread both set the status

    @property
    def is_head(self) -> bool:
        return self.spec.rank == 0

    def run(self, inp: BinaryIO) -> bool:
        """Serve the node until it says Shutdown or goes away (its end of stdin closes).

        Returns whether the MLX thread ended; one blocked in the ring cannot be joined.
        """
        worker = threading.Thread(target=self._work, name="exo-runner-mlx")
        worker.start()
        self._send(StatusChanged(status=self.status))
        shutdown: Task | None = None
        while (message := read_frame(inp)) is not None:
            match message:
                case Task(kind=TaskKind.SHUTDOWN):
                    shutdown = message
                    self._report(shutdown, TaskStatus.RUNNING)
                    self._set_status(RunnerStatus.SHUTTING_DOWN)
                    self._cancelled.update(self._pending_ids())
                    break
                case Task():
                    self._report(message, TaskStatus.PENDING)
                    self._tasks.put(message)
                    self._task_arrived.set()
                case Cancel(task_id=task_id):
                    self._cancelled.add(task_id)
        self._task_arrived.set()
        self._tasks.put(None)
        worker.join(timeout=5)
        if worker.is_alive():  # blocked in the ring, where no Python can reach it
            log.warning("runner=%s MLX thread still blocked in the ring at exit", self.name)
        if shutdown is not None:
            self._set_status(RunnerStatus.SHUTDOWN)
            self._report(shutdown, TaskStatus.COMPLETE)
        return not worker.is_alive()

    @property
    def name(self) -> str:
        return f"{self.spec.instance_id}.{self.spec.rank}"

    # -- the MLX thread ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            if self._serves_ring():
                self._serve_ring()
            if self._chats:  # a round of the batch, then any task that came meanwhile
                self._round()
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    continue
            else:
                task = self._deferred.popleft() if self._deferred else self._tasks.get()
            if task is None:
                self._end_batch(TaskStatus.CANCELLED, "the runner is stopping")
                break
            if self._chats and task.kind != TaskKind.CHAT:
                self._deferred.append(task)  # after the batch, which it would change under its chats
            else:
                self._run(task)
        if self.ring is not None and not self._ring_closed:
            try:
                leave(self.ring)
            except RuntimeError:
                pass  # the others are gone already

    def _serves_ring(self) -> bool:
        self._task_arrived.clear()
        return (not self.is_head and not self._ring_closed and self.status == RunnerStatus.READY
                and self._tasks.empty())

    def _serve_ring(self) -> None:
        assert self.loaded is not None and self.ring is not None
        try:
            self._ring_closed = serve(self.loaded.model, self.ring, self._task_arrived, self._prefix_parts)
            if self._ring_closed:
                log.info("runner=%s the ring was closed upstream", self.name)
        except RuntimeError as e:
            if self.status == RunnerStatus.SHUTTING_DOWN:  # the neighbours are stopping too
                log.info("runner=%s ring closed while stopping: %s", self.name, e)
            else:
                log.error("runner=%s ring failed: %s", self.name, e)
                self._set_status(RunnerStatus.FAILED, f"ring failed: {e}")

    def _run(self, task: Task) -> None:
        if task.task_id in self._cancelled:
            self._cancelled.discard(task.task_id)
            self._report(task, TaskStatus.CANCELLED, "cancelled before it started")
            return
        try:
            step = transition(self.status, task.kind)
        except InvalidTransition as e:
            log.warning("runner=%s task=%s failed: %s", self.name, task.task_id, e)
            self._report(task, TaskStatus.FAILED, str(e))
            return
        if task.kind == TaskKind.CHAT and self.batch is not None:  # Running once the batch admits it
            self._set_status(step.during)
            self._join(task, step)
            return
        self._report(task, TaskStatus.RUNNING)
        self._set_status(step.during)
        self._active = task.task_id
        try:
            outcome = self._perform(task)
        except Exception as e:  # the task fails; the runner reports it and lives on
            reason = f"{type(e).__name__}: {e}"
            expected = isinstance(e, (ValueError, RuntimeError))  # a bad request or a broken ring, not a bug
            log.log(logging.WARNING if expected else logging.ERROR, "runner=%s task=%s %s failed: %s", self.name,
                    task.task_id, task.kind, reason, exc_info=not expected)
            if self.ring is not None and self.ring.lost is not None:  # no task can run on this ring again
                self._set_status(RunnerStatus.FAILED, f"ring lost: {self.ring.lost}")
            else:
                self._set_status(step.on_error, reason if step.on_error == RunnerStatus.FAILED else None)
            self._report(task, TaskStatus.FAILED, reason)
        else:
            self._set_status(step.after)
            self._report(task, outcome, "cancelled" if outcome == TaskStatus.CANCELLED else None)
        finally:
            self._active = None
            self._cancelled.discard(task.task_id)

    def _perform(self, task: Task) -> TaskStatus:
        """Do the task; Complete, or Cancelled for a chat cancelled on the way."""
        spec = self.spec
        match task.kind:
            case TaskKind.CONNECT:
                if len(task.hosts) != spec.world_size:
                    raise ValueError(f"{len(task.hosts)} ring addresses for a ring of {spec.world_size}")
                with tempfile.TemporaryDirectory(prefix="exo-ring-") as tmp:
                    hostfile = Path(tmp) / "hosts.json"
                    write_hostfile(hostfile, task.hosts)
                    self.ring = Ring.join(hostfile, spec.rank)
            case TaskKind.LOAD:
                self.loaded = load(Path(spec.model_path), spec.start, spec.end, spec.dtype, spec.kv_cache, spec.context)
                if self.is_head:  # as many positions again as the instance serves (the planner counts them)
                    context = spec.context or self.loaded.args.max_position_embeddings
                    prefix = PrefixCache(context)
                    if self.ring is not None:
                        self.head = PipelineHead(self.loaded.model, self.ring, prefix)
                    else:
                        self.head, self.batch = LocalHead(self.loaded.model), Batch(self.loaded.model, context, prefix)
            case TaskKind.WARMUP:
                if self.is_head:  # one short request through every rank, so the first real one is not slow
                    with closing(self._tokens(WARMUP_PROMPT, GenerationParams(max_tokens=2))) as tokens:
                        for _ in islice(tokens, 2):
                            pass
            case TaskKind.CHAT:
                return self._chat(task)
        return TaskStatus.COMPLETE

    def _chat(self, task: Task) -> TaskStatus:
        if not self.is_head:
            raise ValueError(f"rank {self.spec.rank} takes no chat tasks; rank 0 of the instance does")
        if task.params is None or not task.prompt:
            raise ValueError("a chat task needs a prompt and sampling parameters")
        assert self.loaded is not None and self.head is not None
        params = task.params
        # Closed here, not left to the garbage collector: closing a pipeline's stream finishes the step in
        # flight on the ring, and a ring lost meanwhile must fail this task, not vanish as an ignored error.
        with closing(detokenize(self._tokens(task.prompt, params), self.loaded.tokenizer, params)) as deltas:
            for delta in deltas:
                if task.task_id in self._cancelled:
                    log.info("runner=%s task=%s cancelled after %d tokens", self.name, task.task_id,
                             delta.n_tokens)
                    return TaskStatus.CANCELLED
                self._send(Generated(task_id=task.task_id, text=delta.text, n_tokens=delta.n_tokens,
                                     finish_reason=delta.finish_reason, stop_sequence=delta.stop_sequence,
                                     cached_tokens=self.head.reused if delta.finish_reason else 0))
        return TaskStatus.COMPLETE

    def _tokens(self, prompt: tuple[int, ...], params: GenerationParams) -> Generator[int, None, None]:
        assert self.head is not None
        return self.head.generate_step(prompt, params)

    # -- the batch -----------------------------------------------------------------------------

    def _join(self, task: Task, step: Transition) -> None:
        assert self.batch is not None and self.loaded is not None
        try:
            if task.params is None or not task.prompt:
                raise ValueError("a chat task needs a prompt and sampling parameters")
            self.batch.join(task.task_id, task.prompt, task.params)
        except ValueError as e:
            log.warning("runner=%s task=%s chat failed: %s", self.name, task.task_id, e)
            if not self._chats:
                self._set_status(step.on_error)
            self._report(task, TaskStatus.FAILED, f"ValueError: {e}")
            return
        self._chats[task.task_id] = _Chat(task, step, Detokenizer(self.loaded.tokenizer, task.params))

    def _round(self) -> None:
        """One round of the batch: each chat's token turned into text and sent; the chats that ended or
        were cancelled leave."""
        assert self.batch is not None
        for task_id in [t for t in self._chats if t in self._cancelled]:
            log.info("runner=%s task=%s cancelled after %d tokens", self.name, task_id, self._chats[task_id].text.n)
            self._leave(task_id, TaskStatus.CANCELLED)
        if not self._chats:
            self._say_batch()
            self._set_status(RunnerStatus.READY)
            return
        try:
            done = self.batch.step()
        except Exception as e:  # every chat's caches may be half written: all of them fail, the runner lives on
            reason = f"{type(e).__name__}: {e}"
            log.exception("runner=%s a round of %d chats failed: %s", self.name, len(self._chats), reason)
            self._end_batch(TaskStatus.FAILED, reason)
            return
        for task_id in done.admitted:
            self._report(self._chats[task_id].task, TaskStatus.RUNNING)
        for task_id, token in done.tokens.items():
            chat = self._chats[task_id]
            if (delta := chat.text.add(token)) is not None:
                reused = self.batch.members[task_id].reused if delta.finish_reason else 0
                self._send(Generated(task_id=task_id, text=delta.text, n_tokens=delta.n_tokens,
                                     finish_reason=delta.finish_reason, stop_sequence=delta.stop_sequence,
                                     cached_tokens=reused))
            if chat.text.finished:
                self._leave(task_id, TaskStatus.COMPLETE)
        self._say_batch()
        if not self._chats:
            self._set_status(RunnerStatus.READY)

    def _say_batch(self) -> None:
        size = len(self.batch.members) if self.batch is not None else 0
        if size != self._batch_said:
            self._batch_said = size
            self._send(BatchChanged(size=size))

    def _leave(self, task_id: str, outcome: TaskStatus) -> None:
        assert self.batch is not None
        chat = self._chats.pop(task_id)
        self.batch.leave(task_id)
        self._cancelled.discard(task_id)
        self._report(chat.task, outcome, "cancelled" if outcome == TaskStatus.CANCELLED else None)

    def _end_batch(self, outcome: TaskStatus, reason: str) -> None:
        """End every chat of the batch with `outcome`, keeping none of their caches."""
        if self.batch is None or not self._chats:
            return
        chats, self._chats = self._chats, {}
        self.batch.clear()
        self._say_batch()
        for chat in chats.values():
            self._cancelled.discard(chat.task.task_id)
            self._report(chat.task, outcome, reason)
        self._set_status(next(iter(chats.values())).step.on_error if outcome == TaskStatus.FAILED
                         else RunnerStatus.READY)

    # -- reporting -----------------------------------------------------------------------------

    def _pending_ids(self) -> list[str]:
        with self._tasks.mutex:
            queued = [t.task_id for t in self._tasks.queue if t is not None]
        return [*queued, *(t.task_id for t in list(self._deferred)), *list(self._chats),
                *([self._active] if self._active else [])]

    def _set_status(self, status: RunnerStatus, error: str | None = None) -> None:
        with self._status_lock:
            if (status == self.status and not error) or not may_become(self.status, status):
                return
            log.info("runner=%s %s -> %s%s", self.name, self.status, status, f" ({error})" if error else "")
            self.status = status
            self._send(StatusChanged(status=status, error=error))

    def _report(self, task: Task, status: TaskStatus, error: str | None = None) -> None:
        self._send(TaskChanged(task_id=task.task_id, kind=task.kind, status=status, error=error))

    def _send(self, message: TaskChanged | StatusChanged | Generated | BatchChanged) -> None:
        with self._write_lock:
            try:
                write_frame(self.out, message)
            except (BrokenPipeError, ValueError):
                pass  # the node is gone; the runner is exiting anyway
