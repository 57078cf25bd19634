"""One request's plumbing for the observed app: ids, headers, the body, the answer.

Small ASGI helpers with no state: the server's own request ids (which say
when they were issued), reading a body no further than a limit, handing
it on again, and sending an answer (an error's without a stack trace).
"""

from __future__ import annotations

import json
import secrets
import sys
import time

from mnist_mlops.monitoring.inference_log import REQUEST_ID
from mnist_mlops.serving.guard import public_error

# How much of a body over its limit is read (and dropped) before the refusal.
DRAIN_LIMITS = 4


def new_request_id() -> str:
    """32 hex digits: the time in milliseconds, then 80 random bits."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def issued_at(request_id: str) -> float | None:
    """When the server issued `request_id` (seconds since the epoch); None for other ids."""
    if len(request_id) != 32:
        return None
    try:
        return int(request_id[:12], 16) / 1000
    except ValueError:
        return None


def header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


def content_length(scope) -> int | None:
    value = header(scope, b"content-length")
    return int(value) if value.isdigit() else None


def client_request_id(scope) -> str:
    """The client's own X-Request-ID when it is a sensible token: kept beside the server's."""
    given = header(scope, b"x-request-id")
    return given if REQUEST_ID.match(given) else ""


def replay(body: bytes, receive):
    """A `receive` that hands over the body already read, then listens on the real one."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def error_body(code: str, message: str) -> dict:
    return {"error_code": code, "message": message}


async def read_body(receive, limit: int, declared: int | None = None) -> bytes | None:
    """The whole body, or None when it (or its Content-Length) is over `limit`.

    A body over the limit is read on and dropped, up to DRAIN_LIMITS times
    the limit, so that a client still sending it gets the refusal rather
    than a reset connection; nothing of it is kept.
    """
    keep = declared is None or declared <= limit
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        keep = keep and size <= limit
        if keep:
            chunks.append(chunk)
        else:
            chunks.clear()
        if not message.get("more_body") or size > DRAIN_LIMITS * limit:
            return b"".join(chunks) if keep else None


async def send_public(held: list, send) -> None:
    """Send a held error answer, its JSON without a stack trace, Content-Length set to match."""
    start, *rest = held
    body = public_error(b"".join(message.get("body", b"") for message in rest))
    headers = [(key, value) for key, value in start["headers"] if key.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def say(line: str) -> None:
    print(f"mnist-mlops serve: {line}", file=sys.stderr, flush=True)


async def respond(answer, status: int, body: bytes, content_type: str = "application/json") -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await answer({"type": "http.response.start", "status": status, "headers": headers})
    await answer({"type": "http.response.body", "body": body})


async def respond_error(answer, status: int, code: str, message: str) -> None:
    await respond(answer, status, json.dumps(error_body(code, message)).encode())
