"""One mapping from exo's errors (and FastAPI's validation errors) to OpenAI's error body."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ExoError)
    async def _exo_error(_: Request, e: ExoError) -> JSONResponse:
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
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return _json(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")
