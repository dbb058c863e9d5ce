"""One mapping from exo's errors (and FastAPI's validation errors) to OpenAI's error body."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from exo.shared.errors import ExoError, ServiceUnavailable

RETRY_AFTER_SECONDS = 5  # what a 503 asks the client to wait


def error_body(error: ExoError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param,
                      "code": type(error).__name__}}


def error_response(error: ExoError) -> JSONResponse:
    """An ExoError as OpenAI's error body with its status; a 503 says when to retry."""
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)} if isinstance(error, ServiceUnavailable) else None
    return JSONResponse(error_body(error), status_code=error.status_code, headers=retry)


def _json(status: int, message: str, error_type: str, param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param(error: Mapping[str, Any], body: Any) -> str | None:
    """The request field a validation error is about: its place in the body, without the tags of
    union members that pydantic adds to the location (`messages.0.content.str`)."""
    loc = tuple(error.get("loc", ()))
    if loc[:1] != ("body",):
        return ".".join(map(str, loc)) or None
    parts: list[str] = []
    value = body
    for i, part in enumerate(loc[1:], start=2):
        missing = i == len(loc) and error.get("type") == "missing"
        if isinstance(value, dict) and (part in value or missing):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            continue  # a union member's tag: no place in the body
        parts.append(str(part))
    return ".".join(parts) or None


def retry_header(status: int) -> dict[str, str] | None:
    """What a 503 carries, whatever API's shape its body is in: when to try again."""
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None


def first_problem(error: ValidationError) -> str:
    """A body's first validation error as one line, `where: what`, for the routes that answer errors in
    another API's shape (Anthropic's, Ollama's)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else f"Invalid request: {first['msg']}"


ErrorShape = Callable[[int, str], JSONResponse]  # a status and a message as another API answers them


def install_error_handlers(app: FastAPI, shapes: Mapping[str, ErrorShape] | None = None) -> None:
    """OpenAI's error body everywhere, but under the path prefixes `shapes` names (the routes of
    Anthropic's and Ollama's APIs), which answer in their own: a wrong method or path there, say."""

    def shaped(request: Request) -> ErrorShape | None:
        path = request.url.path
        return next((shape for prefix, shape in (shapes or {}).items() if path.startswith(prefix)), None)

    @app.exception_handler(ExoError)
    async def _exo_error(request: Request, e: ExoError) -> JSONResponse:
        if (shape := shaped(request)) is not None:
            return shape(e.status_code, e.message)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "malformed JSON")
            return _json(400, f"The request body is not valid JSON: {reason}", "invalid_request_error",
                         code="json_invalid")
        param = _param(first, e.body)
        message = f"{param}: {first['msg']}" if param else f"Invalid request body: {first['msg']}"
        return _json(400, message, "invalid_request_error", param, first.get("type"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        if (shape := shaped(request)) is not None:
            return shape(e.status_code, str(e.detail))
        return _json(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")
