"""MLflow's scoring app, observed: request ids, metrics, the inference log and `POST /feedback`.

An ASGI app around the scoring app and its hot path (hotpath.py). Every
request gets an id of the server's own (the time and 80 random bits), in
the answer's `X-Request-ID`; a client's own `X-Request-ID` comes back as
`X-Client-Request-ID` and is logged with the rows, but never names them,
so two clients cannot make their requests collide. The model's `predict`
hands its input and answer to the request it serves; just before the
answer goes out, its images are counted and queued for the inference log,
whose writer remembers the request for feedback: nothing waits for the disk.
The boundary's limits (`guard.py`) run before a byte of the body is
parsed, and an error answer never carries a stack trace. `POST /feedback`
(feedback.py) takes one true digit per image of a request, in order.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import time
from dataclasses import dataclass

from mnist_mlops.serving.exchange import (
    client_request_id,
    content_length,
    first_line,
    header,
    new_request_id,
    read_body,
    replay,
    respond,
    respond_error,
    say,
    send_public,
)
from mnist_mlops.serving.feedback import FeedbackDesk
from mnist_mlops.serving.guard import body_limit, refusal
from mnist_mlops.serving.hotpath import INLINE_BODY_BYTES, HotPath, hot_path_of

# A model logged without its own limit: the classifier's default.
DEFAULT_MAX_BATCH_SIZE = 1024

# The request a `predict` call serves: a list that the wrapped predict fills.
_ANSWERS: contextvars.ContextVar[list | None] = contextvars.ContextVar("answers", default=None)


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


def observe(app, model, served, metrics: bool, log_settings, siblings: str = ""):
    """Wrap the scoring app of `model` with what was asked: metrics, the inference log, or both.

    `siblings` is the private folder of a server's workers (workers.py), when it has several.
    """
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
            on_shipped=server_metrics.log_shipped.inc if server_metrics else _ignore,
            on_ship_failed=server_metrics.log_ship_failures.inc if server_metrics else _ignore,
        )
        index = RequestIndex(log_settings.directory)
    _wrap_predict(model)
    hot = hot_path_of(model)
    return ObservedApp(Serving(app, served, hot), model, server_metrics, log, index, siblings)


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
    """The scoring app, its hot path and what it serves: replaced as one, on a swap."""

    app: object
    served: object
    hot: HotPath | None = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """`X-Model-Version: NAME/VERSION` for a registered version; nothing otherwise."""
        name, version = self.served.name, self.served.version
        return [(b"x-model-version", f"{name}/{version}".encode())] if version else []


class ObservedApp:
    def __init__(self, current: Serving, model, metrics, log, index, siblings: str = "") -> None:
        self.current, self.metrics, self.log, self.index = current, metrics, log, index
        self.follower = None
        self.desk = FeedbackDesk(log, index, siblings)
        self.max_batch_size = max_batch_size_of(model)

    def swap(self, app, model, served) -> None:
        """Serve `model` from the next request on; requests in flight finish on the old one."""
        _wrap_predict(model)
        self.max_batch_size = max_batch_size_of(model)
        if self.metrics is not None:
            self.metrics.now_serving(served)
        self.current = Serving(app, served, hot_path_of(model))

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
        # The server's own id: one client cannot make it collide with another's.
        request_id = new_request_id()
        extra_headers = [(b"x-request-id", request_id.encode())]
        client_id = client_request_id(scope)
        if client_id:
            extra_headers.append((b"x-client-request-id", client_id.encode()))
        # The version that answers this request, whatever is swapped in meanwhile.
        current = self.current
        extra_headers += current.headers
        answers: list = []
        # An error answer is held until the app is done, then sent without a stack trace.
        held: list = []
        sent_start = counted = False

        def count() -> None:
            # Before the answer's last byte leaves: a client that reads this
            # worker's /metrics next finds its request counted.
            nonlocal counted
            if not counted and self.metrics is not None:
                self.metrics.request(path, status, time.perf_counter() - started, answers)
            counted = True

        async def answer(message) -> None:
            nonlocal status, sent_start
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
                if status >= 400:
                    held.append(message)
                    return
                if status == 200 and answers:
                    # Recorded before the client has the answer, so that feedback
                    # sent the moment it arrives finds its request.
                    self._answered(request_id, client_id, answers, current.served.version)
                sent_start = True
            elif held:
                held.append(message)  # sent once the app is done: it may yet raise
                return
            elif not message.get("more_body"):
                count()
            await send(message)

        token = _ANSWERS.set(answers)
        try:
            if path == "/metrics" and self.metrics is not None:
                await self._metrics(answer)
            elif path == "/feedback":
                await self._feedback(scope, receive, answer)
            elif path == "/invocations" and scope["method"] == "POST":
                await self._invocations(scope, receive, answer, current)
            else:
                await current.app(scope, receive, answer)
            if held:
                count()
                await send_public(held, send)
        except Exception as error:
            # One line in the log, never a traceback; the client gets JSON, never a stack.
            status = 400 if isinstance(error, RecursionError) else 500
            say(f"{scope['method']} {path} failed: {first_line(error)}")
            if not sent_start:
                held.clear()
                message = (
                    "the request is nested too deeply"
                    if status == 400
                    else "the server failed to answer this request"
                )
                code = "INVALID_PARAMETER_VALUE" if status == 400 else "INTERNAL_ERROR"
                await respond_error(answer, status, code, message)
                count()
                await send_public(held, send)
        finally:
            _ANSWERS.reset(token)
            count()

    async def _invocations(self, scope, receive, answer, current: Serving) -> None:
        """Refuse what cannot be a batch within the limit from the raw body; else score it.

        On the hot path when it takes the request (hotpath.py), else in MLflow's app.
        """
        limit = body_limit(self.max_batch_size)
        body = await read_body(receive, limit, content_length(scope))
        if body is None:
            message = (
                f"the request body is over {limit} bytes, the room for {self.max_batch_size} "
                "images (serving.max_batch_size): send fewer images per request"
            )
            await respond_error(answer, 413, "REQUEST_LIMIT_EXCEEDED", message)
            return
        problem = refusal(header(scope, b"content-type"), body, self.max_batch_size)
        if problem:
            await respond_error(answer, 400, "INVALID_PARAMETER_VALUE", problem)
            return
        if current.hot is not None:
            content_type = header(scope, b"content-type")
            if len(body) <= INLINE_BODY_BYTES:
                reply = current.hot.answer(content_type, body)
            else:
                reply = await asyncio.to_thread(current.hot.answer, content_type, body)
            if reply is not None:
                await respond(answer, 200, reply)
                return
        await current.app(scope, replay(body, receive), answer)

    def _answered(self, request_id: str, client_id: str, answers: list, version: str) -> None:
        if self.log is not None:
            for images, predictions in answers:
                self.log.submit_rows(request_id, images, predictions, version, client_id)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self.log is not None:
            self.log.close()
        if self.metrics is not None:
            self.metrics.close()

    def _closing_on_shutdown(self, send):
        async def closing(message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await asyncio.to_thread(self.close)
            await send(message)

        return closing

    async def _metrics(self, answer) -> None:
        body, content_type = self.metrics.exposition()
        await respond(answer, 200, body, content_type)

    async def _feedback(self, scope, receive, answer) -> None:
        status, reply = await self.desk.take(scope, receive)
        if self.metrics is not None:
            outcome = reply.get("error_code", "duplicate" if reply.get("duplicate") else "recorded")
            self.metrics.feedback.labels(outcome=outcome.lower()).inc()
        await respond(answer, status, json.dumps(reply).encode(), "application/json")


def max_batch_size_of(model) -> int:
    """The served model's own batch limit (serving.max_batch_size when it was logged)."""
    try:
        limit = model.unwrap_python_model().max_batch_size
    except Exception:  # not a model of this project's class: the default limit
        return DEFAULT_MAX_BATCH_SIZE
    return int(limit)
