"""Servers told at once: a registry webhook wakes the follower when the alias moves.

MLflow 3's tracking server (SQL stores) calls the webhooks registered with
it on registry events; setting an alias is `model_version_alias.created`,
removing one `model_version_alias.deleted`. `mnist-mlops serve`, following
`models:/NAME@ALIAS` through a tracking server, registers one at start for
its own address (`POST /hooks/mlflow`), with a secret made for this start
and never written down, and deletes it when it stops. A call is signed as
MLflow signs it (Standard Webhooks): `X-MLflow-Signature: v1,<base64 of
HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")>`. An unsigned,
wrongly signed or stale call (its timestamp more than MAX_AGE_SECONDS away)
is refused with 401 and counted; a good one is counted and only wakes the
follower, which reads the alias from the registry and loads, checks and
swaps as it does every --follow-seconds. Nothing in the call is trusted
beyond "look now", so a replayed call costs one look.

Polling stays: with the embedded SQLite store (no server to call), a
tracking server that refuses the webhook (only admins may register them), or
a lost delivery, the follower still looks every --follow-seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

HOOK_PATH = "/hooks/mlflow"
SIGNATURE_HEADER = b"x-mlflow-signature"
TIMESTAMP_HEADER = b"x-mlflow-timestamp"
DELIVERY_HEADER = b"x-mlflow-delivery-id"
MAX_AGE_SECONDS = 300
MAX_BODY_BYTES = 64 * 1024
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a call: v1,<base64 HMAC-SHA256 of id.timestamp.body>."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def refusal(secret: str, headers: dict[bytes, bytes], body: bytes, now: float) -> str:
    """Why a call is refused ("" for a good one)."""
    given = headers.get(SIGNATURE_HEADER, b"").decode("latin-1")
    timestamp = headers.get(TIMESTAMP_HEADER, b"").decode("latin-1")
    delivery_id = headers.get(DELIVERY_HEADER, b"").decode("latin-1")
    if not (given and timestamp and delivery_id):
        return "unsigned"
    if not timestamp.isdigit() or abs(now - int(timestamp)) > MAX_AGE_SECONDS:
        return "stale"
    expected = signature(secret, delivery_id, timestamp, body)
    if not any(hmac.compare_digest(expected, part.strip()) for part in given.split(" ")):
        return "bad signature"
    return ""


class Hooked:
    """The server's app, with `POST /hooks/mlflow` answered here: verified, counted, `wake()`."""

    def __init__(self, app, secret: str, wake: Callable[[], None], count, on_shutdown=None):
        self.app, self.secret, self.wake, self.count = app, secret, wake, count
        self.on_shutdown = on_shutdown

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" and self.on_shutdown is not None:
            await self.app(scope, receive, self._after_shutdown(send))
            return
        if scope["type"] != "http" or scope["path"] != HOOK_PATH:
            await self.app(scope, receive, send)
            return
        body, complete = b"", False
        while not complete and len(body) <= MAX_BODY_BYTES:
            message = await receive()
            body += message.get("body", b"")
            complete = not message.get("more_body", False)
        if scope["method"] != "POST":
            reason, status = "not POST", 405
        elif len(body) > MAX_BODY_BYTES:
            reason, status = "too large", 413
        else:
            reason = refusal(self.secret, dict(scope["headers"]), body, time.time())
            status = 401 if reason else 200
        self.count("accepted" if not reason else "refused")
        if not reason:
            self.wake()
        answer = {"status": "looking"} if not reason else {"message": f"refused: {reason}"}
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    def _after_shutdown(self, send):
        async def sending(message):
            if message["type"] == "lifespan.shutdown.complete":
                self.on_shutdown()
            await send(message)

        return sending


def wanted(model_uri: str, follow_seconds: float) -> bool:
    """A webhook helps a server that follows an alias through a tracking server."""
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    return (
        follow_seconds > 0
        and model_uri.startswith("models:/")
        and "@" in model_uri
        and tracking.startswith(("http://", "https://"))
    )


def hook_url(host: str, port: int) -> str:
    """Where a tracking server on this machine reaches this server (loopback for a wildcard)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{HOOK_PATH}"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def register(name: str, alias: str, url: str, secret: str) -> str:
    """Register the webhook (replacing this address's old ones); return its id.

    Raises MlflowException when the tracking server refuses or lacks webhooks.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    for old in client.list_webhooks(max_results=1000):
        if old.url == url:
            client.delete_webhook(old.webhook_id)
    webhook = client.create_webhook(
        # Letters, digits, dots, underscores and hyphens, under 63 characters.
        name=re.sub(r"[^A-Za-z0-9._-]+", "-", f"mnist-serve-{urlsplit(url).netloc}")[:62],
        url=url,
        events=list(EVENTS),
        description=f"wakes `mnist-mlops serve` following models:/{name}@{alias}",
        secret=secret,
    )
    return webhook.webhook_id


def unregister(webhook_id: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().delete_webhook(webhook_id)


def told_from_elsewhere(model_uri: str, url: str, secret: str) -> str:
    """`register` in a short-lived process (the supervisor imports no MLflow); "" if refused."""
    name, alias = model_uri.removeprefix("models:/").split("@", 1)
    command = [sys.executable, "-m", __name__, "register", name, alias, url]
    result = subprocess.run(command, input=secret, capture_output=True, text=True, timeout=120)
    lines = (result.stdout if result.returncode == 0 else result.stderr).strip().splitlines()
    last = lines[-1] if lines else f"exit status {result.returncode}"
    if result.returncode:
        say_polling(last)
        return ""
    say_told(url, last)
    return last


def unregister_elsewhere(webhook_id: str) -> None:
    command = [sys.executable, "-m", __name__, "unregister", webhook_id]
    subprocess.run(command, capture_output=True, timeout=60)


def say_told(url: str, webhook_id: str) -> None:
    print(f"mnist-mlops serve: told of alias moves by webhook {webhook_id} at {url}", flush=True)


def say_polling(why: str) -> None:
    print(
        f"mnist-mlops serve: no webhook ({why}); the alias is looked at every --follow-seconds",
        file=sys.stderr,
        flush=True,
    )


def first_line(error: Exception) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return str(text).strip().splitlines()[0]


if __name__ == "__main__":
    # python -m mnist_mlops.serving.webhook register NAME ALIAS URL (secret on stdin)
    #                                       unregister WEBHOOK_ID
    try:
        if sys.argv[1] == "register":
            print(register(*sys.argv[2:5], sys.stdin.read()))
        else:
            unregister(sys.argv[2])
    except Exception as error:
        print(first_line(error), file=sys.stderr)
        sys.exit(1)
