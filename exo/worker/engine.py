"""The node's local inference engine: one thread owns MLX and serves jobs in arrival order.

HTTP handlers never touch MLX. They submit a job and read its results from an asyncio queue
that the engine thread fills with `loop.call_soon_threadsafe`; a handler whose client went away
sets the job's `cancelled` event and the engine stops generating at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from exo.engine.generate import Delta, GenerationParams, generate_text
from exo.engine.loading import LoadedModel, load
from exo.models.catalog import ModelCatalog
from exo.shared.errors import ExoError, ModelError, ServiceUnavailable
from exo.shared.types import Dtype

log = logging.getLogger(__name__)

_END = object()


@dataclass
class _Job:
    model_id: str
    loop: asyncio.AbstractEventLoop
    results: asyncio.Queue[Any]
    prompt: list[int] | None = None
    params: GenerationParams | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.results.put_nowait, item)


@dataclass(frozen=True)
class ModelHandle:
    """What a request handler needs to know about a loaded model, without touching MLX."""

    model_id: str
    loaded: LoadedModel

    @property
    def context_length(self) -> int:
        return self.loaded.args.max_position_embeddings


class LocalEngine:
    def __init__(self, catalog: ModelCatalog, *, dtype: Dtype = "float32",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog, self.dtype, self.clock = catalog, dtype, clock
        self.models: dict[str, LoadedModel] = {}
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.active: _Job | None = None
        self.last_progress = clock()

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize() + (self.active is not None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="exo-engine")
        self._thread.start()

    def stop(self) -> None:
        """Finish the current job's next token, drop queued jobs, and join the thread."""
        if self._thread is None:
            return
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.put(ServiceUnavailable("The node is shutting down; retry on another node."))
                job.put(_END)
        if self.active is not None:
            self.active.cancelled.set()
        self._jobs.put(None)
        self._thread.join()
        self._thread = None

    async def load(self, model_id: str) -> ModelHandle:
        """Load `model_id` (fetching its files if needed) and return its handle."""
        if model_id in self.models:
            return ModelHandle(model_id, self.models[model_id])
        async for _ in self._submit(model_id):
            pass
        return ModelHandle(model_id, self.models[model_id])

    async def generate(self, model_id: str, prompt: list[int], params: GenerationParams) -> AsyncIterator[Delta]:
        async for delta in self._submit(model_id, prompt, params):
            yield delta

    async def _submit(self, model_id: str, prompt: list[int] | None = None,
                      params: GenerationParams | None = None) -> AsyncIterator[Any]:
        if self._thread is None:
            raise ServiceUnavailable("The engine is not running.")
        loop = asyncio.get_running_loop()
        job = _Job(model_id, loop, asyncio.Queue(), prompt, params)
        self._jobs.put(job)
        try:
            while (item := await job.results.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    def _serve(self) -> None:
        try:
            self._serve_jobs()
        finally:
            mx.synchronize()  # let queued work finish before the thread (and maybe the process) ends

    def _serve_jobs(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            self.active, self.last_progress = job, self.clock()
            try:
                self._run(job)
            except ExoError as e:
                job.put(e)
            except Exception as e:  # a bug or a broken model must fail this job, not the node
                log.exception("model=%s job failed", job.model_id)
                job.put(ModelError(f"Generation failed: {type(e).__name__}: {e}"))
            finally:
                self.active = None
                job.put(_END)

    def _run(self, job: _Job) -> None:
        loaded = self._ensure_loaded(job.model_id)
        if job.prompt is None or job.params is None:
            return
        model = loaded.model
        started = self.clock()
        n = 0
        for delta in generate_text(job.prompt, model, loaded.tokenizer, job.params, model.make_cache()):
            self.last_progress, n = self.clock(), delta.n_tokens
            if job.cancelled.is_set():
                log.info("model=%s generation cancelled after %d tokens", job.model_id, n)
                return
            job.put(delta)
        log.info("model=%s prompt=%d generated=%d in %.2fs", job.model_id, len(job.prompt), n,
                 self.clock() - started)

    def _ensure_loaded(self, model_id: str) -> LoadedModel:
        if model_id not in self.models:
            path = self.catalog.path(model_id)
            self.models[model_id] = load(path, dtype=self.dtype)
        return self.models[model_id]
