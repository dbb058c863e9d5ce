"""A node that forwards a chat to the node serving it, when that node dies mid-stream (found by `exo soak`)."""

import asyncio
import json

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

from exo.api.anthropic import stream_cut
from exo.api.openai.router import forward

CHUNK = b'data: {"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}\n\n'


async def dying_upstream(content_type: str) -> tuple[asyncio.Server, str]:
    """An HTTP server that starts a chunked response, sends one chunk and drops the connection."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # headers; the body is not read
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n".encode())
        writer.write(f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_stream_cut_upstream_ends_with_an_error_event_and_done() -> None:
    server, upstream = await dying_upstream("text/event-stream")  # in the test's own event loop
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await forward(request, upstream)

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
            answer = await asyncio.wait_for(client.post("/v1/chat/completions", json={"stream": True}), 30)
    finally:
        server.close()  # not wait_closed(): on some 3.11 releases it waits on connections the handler ended

    events = [line[len("data: "):] for line in answer.text.splitlines() if line.startswith("data: ")]
    assert answer.status_code == 200
    assert events[0] == CHUNK.decode().strip()[len("data: "):]
    assert json.loads(events[1])["error"]["code"] == "ServiceUnavailable"
    assert "stopped mid-stream" in json.loads(events[1])["error"]["message"]
    assert events[2:] == ["[DONE]"]


async def test_an_anthropic_stream_cut_upstream_ends_with_anthropics_error_event() -> None:
    server, upstream = await dying_upstream("text/event-stream")
    app = FastAPI()

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await forward(request, upstream, cut=stream_cut)

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
            answer = await asyncio.wait_for(client.post("/v1/messages", json={"stream": True}), 30)
    finally:
        server.close()

    assert answer.text.startswith(CHUNK.decode())
    event, data = answer.text[len(CHUNK):].strip().splitlines()
    assert event == "event: error" and "[DONE]" not in answer.text
    error = json.loads(data.removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
    assert "stopped mid-stream" in error["error"]["message"]
