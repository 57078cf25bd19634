"""MLflow's scoring app, observed: request ids, metrics, the inference log and `POST /feedback`.

An ASGI app around the scoring app. Every request gets an id (the client's
own `X-Request-ID` when it is a sensible token, else a new one), returned in
the answer's `X-Request-ID`. The model's `predict` is wrapped to hand its
input and answer to the request it serves; once the answer has gone out,
the request's images are counted and queued for the inference log. Nothing
on the request path waits for the disk.

`POST /feedback` takes `{"request_id": "...", "digits": [3, 7]}`, one true
digit per image of that request, in order.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from mnist_mlops.monitoring.inference_log import REQUEST_ID
from mnist_mlops.serving.proxy import MAX_FEEDBACK_BYTES

# The request a `predict` call serves: a list that the wrapped predict fills.
_ANSWERS: contextvars.ContextVar[list | None] = contextvars.ContextVar("answers", default=None)
# Requests this process logged, for feedback that comes back to it soon.
RECENT_REQUESTS = 100_000


def record_answers(python_model) -> None:
    """Make the model hand each batch it scores, and its answer, to the request being served."""
    original = python_model.predict

    # Not functools.wraps: MLflow reads predict's signature on every call, and
    # through __wrapped__ that costs more. This one has the same parameters.
    def predict(context, model_input, params=None):
        answer = original(context, model_input, params)
        answers = _ANSWERS.get()
        if answers is not None:
            answers.append((model_input, answer))
        return answer

    python_model.predict = predict


def observe(app, model, served, metrics: bool, log_settings):
    """Wrap the scoring app of `model` with what was asked: metrics, the inference log, or both."""
    from mnist_mlops.monitoring.inference_log import InferenceLog
    from mnist_mlops.monitoring.log_files import RequestIndex
    from mnist_mlops.serving.metrics import ServerMetrics

    server_metrics = ServerMetrics(served) if metrics else None
    log = index = None
    if log_settings is not None:
        log = InferenceLog(
            log_settings,
            served.name or served.uri,
            served.version,
            on_written=server_metrics.log_written.inc if server_metrics else _ignore,
            on_dropped=server_metrics.log_dropped.inc if server_metrics else _ignore,
        )
        index = RequestIndex(log_settings.directory)
    _wrap_predict(model)
    return ObservedApp(Serving(app, served), server_metrics, log, index)


def _wrap_predict(model) -> None:
    from mlflow.exceptions import MlflowException

    try:
        record_answers(model.unwrap_python_model())
    except MlflowException:  # not a model of a Python class: nothing to wrap
        print(
            "mnist-mlops serve: warning: not a Python-function model; its answers are neither "
            "counted nor logged",
            file=sys.stderr,
        )


def _ignore(_rows: int) -> None:
    pass


@dataclass(frozen=True)
class Serving:
    """The scoring app and what it serves: replaced as one, by one assignment, on a swap."""

    app: object
    served: object

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """`X-Model-Version: NAME/VERSION` for a registered version; nothing otherwise."""
        name, version = self.served.name, self.served.version
        return [(b"x-model-version", f"{name}/{version}".encode())] if version else []


class ObservedApp:
    def __init__(self, current: Serving, metrics, log, index) -> None:
        self.current, self.metrics, self.log, self.index = current, metrics, log, index
        self.follower = None
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._feedback_seen: OrderedDict[str, None] = OrderedDict()

    def swap(self, app, model, served) -> None:
        """Serve `model` from the next request on; requests in flight finish on the old one."""
        _wrap_predict(model)
        if self.metrics is not None:
            self.metrics.now_serving(served)
        self.current = Serving(app, served)

    def refused(self) -> None:
        if self.metrics is not None:
            self.metrics.swaps.labels(outcome="refused").inc()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.current.app(scope, receive, self._closing_on_shutdown(send))
            return
        if scope["type"] != "http":
            await self.current.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        status = 500
        request_id = _request_id(scope)
        # The version that answers this request, whatever is swapped in meanwhile.
        current = self.current

        async def answer(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                    *current.headers,
                ]
                message = {**message, "headers": headers}
            await send(message)

        answers: list = []
        token = _ANSWERS.set(answers)
        try:
            if path == "/metrics" and self.metrics is not None:
                await self._metrics(answer)
            elif path == "/feedback":
                await self._feedback(scope, receive, answer)
            else:
                await current.app(scope, receive, answer)
        finally:
            _ANSWERS.reset(token)
            if self.metrics is not None:
                self.metrics.request(path, status, time.perf_counter() - started)
        if status == 200 and answers:
            self._answered(request_id, answers, current.served.version)

    def _answered(self, request_id: str, answers: list, version: str) -> None:
        for images, predictions in answers:
            if self.metrics is not None:
                self.metrics.answered(predictions)
            if self.log is not None and self.log.submit_rows(
                request_id, images, predictions, version
            ):
                self._recent[request_id] = len(images)
                if len(self._recent) > RECENT_REQUESTS:
                    self._recent.popitem(last=False)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self.log is not None:
            self.log.close()

    def _closing_on_shutdown(self, send):
        async def closing(message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await asyncio.to_thread(self.close)
            await send(message)

        return closing

    async def _metrics(self, answer) -> None:
        body, content_type = self.metrics.exposition()
        await _respond(answer, 200, body, content_type)

    async def _feedback(self, scope, receive, answer) -> None:
        status, reply = await self._record_feedback(scope, receive)
        if self.metrics is not None:
            outcome = reply.get("error_code", "duplicate" if reply.get("duplicate") else "recorded")
            self.metrics.feedback.labels(outcome=outcome.lower()).inc()
        await _respond(answer, status, json.dumps(reply).encode(), "application/json")

    async def _record_feedback(self, scope, receive) -> tuple[int, dict]:
        if scope["method"] != "POST":
            return 405, _error("BAD_REQUEST", "use POST /feedback")
        if self.log is None:
            return 404, _error("RESOURCE_DOES_NOT_EXIST", "the inference log is off on this server")
        body = await _read_body(receive, MAX_FEEDBACK_BYTES)
        if body is None:
            return 413, _error("BAD_REQUEST", f"feedback is limited to {MAX_FEEDBACK_BYTES} bytes")
        try:
            feedback = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return 400, _error("BAD_REQUEST", "the body must be JSON")
        problem = _feedback_problem(feedback)
        if problem:
            return 400, _error("INVALID_PARAMETER_VALUE", problem)
        request_id, digits = feedback["request_id"], feedback["digits"]
        images = self._recent.get(request_id)
        if images is None:
            images = await asyncio.to_thread(self.index.images_of, request_id)
        if images is None:
            return 404, _error(
                "RESOURCE_DOES_NOT_EXIST",
                f"no request {request_id!r} in the inference log (unknown, sampled out, "
                "expired, or logged less than a second ago: try again)",
            )
        if len(digits) != images:
            return 400, _error(
                "INVALID_PARAMETER_VALUE",
                f"request {request_id!r} had {images} image(s); got {len(digits)} digit(s)",
            )
        if request_id in self._feedback_seen:
            return 200, {"request_id": request_id, "recorded": 0, "duplicate": True}
        if not self.log.submit_feedback(request_id, digits):
            return 503, _error("TEMPORARILY_UNAVAILABLE", "the inference log is full: try again")
        self._feedback_seen[request_id] = None
        if len(self._feedback_seen) > RECENT_REQUESTS:
            self._feedback_seen.popitem(last=False)
        return 200, {"request_id": request_id, "recorded": len(digits), "duplicate": False}


def _request_id(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if REQUEST_ID.match(given):
                return given
    return uuid.uuid4().hex


def _feedback_problem(feedback) -> str:
    if not isinstance(feedback, dict) or set(feedback) != {"request_id", "digits"}:
        return 'expected {"request_id": "...", "digits": [d0, d1, ...]}'
    if not isinstance(feedback["request_id"], str) or not REQUEST_ID.match(feedback["request_id"]):
        return "request_id must be the X-Request-ID the prediction was answered with"
    digits = feedback["digits"]
    if not isinstance(digits, list) or not digits:
        return "digits must be a non-empty list, one true digit per image, in order"
    for digit in digits:
        if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
            return f"every digit must be an integer in 0–9, got {digit!r}"
    return ""


def _error(code: str, message: str) -> dict:
    return {"error_code": code, "message": message}


async def _read_body(receive, limit: int) -> bytes | None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            return body


async def _respond(answer, status: int, body: bytes, content_type: str) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await answer({"type": "http.response.start", "status": status, "headers": headers})
    await answer({"type": "http.response.body", "body": body})
