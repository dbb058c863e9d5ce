"""Runners: give one a lifecycle task by hand (a warm-up, say); its own node takes it."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from exo.api.forward import ask_node
from exo.master.service import ClusterService
from exo.shared.errors import ModelNotFound, ServiceUnavailable
from exo.shared.runners import TaskKind
from exo.worker.supervisor import Supervisor


class RunnerTask(BaseModel):
    kind: TaskKind


def runners_router(cluster: ClusterService, supervisor: Supervisor) -> APIRouter:
    router = APIRouter()

    @router.post("/runners/{runner_id}/tasks", response_model=None)
    async def run_task(runner_id: str, body: RunnerTask, request: Request) -> dict[str, str] | Response:
        """Queue a task on a runner. The runner checks it against its state machine: a task that does
        not fit fails (see the task in GET /state) and the runner carries on."""
        if runner_id in supervisor.runners:
            return {"runner_id": runner_id, "task_id": await supervisor.run_task(runner_id, body.kind)}
        if (runner := cluster.coordinator.state.runners.get(runner_id)) is None:
            raise ModelNotFound(f"No runner {runner_id!r}; GET /state lists the runners.", param="runner_id")
        if (url := cluster.transport.url(runner.node_id)) is None:
            raise ServiceUnavailable(f"The node of runner {runner_id} is not reachable; retry shortly.")
        answer = await ask_node(url, "POST", request.url.path, await request.body(),
                                who=f"The node of runner {runner_id}")
        retry = {"Retry-After": answer.headers["retry-after"]} if "retry-after" in answer.headers else None
        return Response(answer.content, status_code=answer.status_code, media_type="application/json", headers=retry)

    return router
