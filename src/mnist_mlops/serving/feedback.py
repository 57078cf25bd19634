"""`POST /feedback`: a true digit for each image of a request this server or another answered.

The body is `{"request_id": "...", "digits": [3, 7]}`, one true digit per
image of that request, in order. A request this process answered is known
before its answer left; one that another replica answered is found in the
inference log once that replica has written it (within its flush interval):
the server's ids say when they were issued, so feedback for a request
answered a moment ago waits for it rather than being refused. With the log
in a folder, the wait ends as soon as every writer has marked that it wrote
what it held when the feedback arrived (log_files.py): an id that no writer
logged (unknown, or sampled out) is refused then, not after the whole wait.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from mnist_mlops.monitoring.inference_log import REQUEST_ID
from mnist_mlops.monitoring.log_files import written_past
from mnist_mlops.monitoring.log_rows import RECENT_REQUESTS
from mnist_mlops.serving.exchange import error_body, issued_at, read_body
from mnist_mlops.serving.proxy import MAX_FEEDBACK_BYTES

# How long after its rows should be in the log a request is still waited for.
LOGGED_WITHIN_SECONDS = 5.0


class Seen:
    """The requests whose feedback this process recorded (the last RECENT_REQUESTS)."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()

    def claim(self, request_id: str) -> bool:
        """True if no feedback for `request_id` was recorded yet; it is now taken."""
        if request_id in self._seen:
            return False
        self._seen[request_id] = None
        if len(self._seen) > RECENT_REQUESTS:
            self._seen.popitem(last=False)
        return True

    def release(self, request_id: str) -> None:
        self._seen.pop(request_id, None)


class SharedSeen(Seen):
    """The same for every worker of one server: a SQLite table in the workers' private folder.

    A claim is one INSERT OR IGNORE, so two workers given the same feedback at
    once record it once. The table is the folder's, gone with the server.
    """

    def __init__(self, folder: str) -> None:
        self._database = sqlite3.connect(
            Path(folder) / "feedback-seen.sqlite",
            timeout=30,
            isolation_level=None,
            check_same_thread=False,
        )
        self._database.execute("PRAGMA journal_mode=WAL")
        self._database.execute("PRAGMA synchronous=OFF")  # gone with the server anyway
        self._database.execute("CREATE TABLE IF NOT EXISTS seen (request_id TEXT PRIMARY KEY)")

    def claim(self, request_id: str) -> bool:
        inserted = self._database.execute(
            "INSERT OR IGNORE INTO seen VALUES (?)", (request_id,)
        ).rowcount
        if inserted:
            self._database.execute(
                "DELETE FROM seen WHERE rowid <= (SELECT max(rowid) FROM seen) - ?",
                (RECENT_REQUESTS,),
            )
        return inserted == 1

    def release(self, request_id: str) -> None:
        self._database.execute("DELETE FROM seen WHERE request_id = ?", (request_id,))


class FeedbackDesk:
    """What `/feedback` needs: the requests answered here, the log, and its index."""

    def __init__(self, log, index, siblings: str = "") -> None:
        self.log, self.index = log, index
        self._feedback_seen = SharedSeen(siblings) if siblings and log is not None else Seen()
        self._index_lock = threading.Lock()

    async def take(self, scope, receive) -> tuple[int, dict]:
        if scope["method"] != "POST":
            return 405, error_body("BAD_REQUEST", "use POST /feedback")
        if self.log is None:
            return 404, error_body(
                "RESOURCE_DOES_NOT_EXIST", "the inference log is off on this server"
            )
        body = await read_body(receive, MAX_FEEDBACK_BYTES)
        if body is None:
            return 413, error_body(
                "BAD_REQUEST", f"feedback is limited to {MAX_FEEDBACK_BYTES} bytes"
            )
        try:
            feedback = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return 400, error_body("BAD_REQUEST", "the body must be JSON")
        problem = feedback_problem(feedback)
        if problem:
            return 400, error_body("INVALID_PARAMETER_VALUE", problem)
        request_id, digits = feedback["request_id"], feedback["digits"]
        images, settled = self.log.images_of(request_id), True
        if images is None:
            images, settled = await self._logged_images(request_id)
        if images is None:
            why = (
                "every writer has written what it held when this feedback came"
                if settled
                else "or logged less than a second ago: try again"
            )
            return 404, error_body(
                "RESOURCE_DOES_NOT_EXIST",
                f"no request {request_id!r} in the inference log (unknown, sampled out, "
                f"expired; {why})",
            )
        if len(digits) != images:
            return 400, error_body(
                "INVALID_PARAMETER_VALUE",
                f"request {request_id!r} had {images} image(s); got {len(digits)} digit(s)",
            )
        if not self._feedback_seen.claim(request_id):
            return 200, {"request_id": request_id, "recorded": 0, "duplicate": True}
        if not self.log.submit_feedback(request_id, digits):
            self._feedback_seen.release(request_id)
            return 503, error_body(
                "TEMPORARILY_UNAVAILABLE", "the inference log is full: try again"
            )
        return 200, {"request_id": request_id, "recorded": len(digits), "duplicate": False}

    async def _logged_images(self, request_id: str) -> tuple[int | None, bool]:
        """(images, settled) of a request another process answered, read from the log.

        `settled`: every writer had marked that it wrote what it held when the
        feedback came, so a request not found is not there. The log holds a
        request about `flush_seconds` after it was answered, and the id says
        when that was: feedback for a request answered a moment ago by another
        replica waits until its rows are written rather than being refused.
        """
        settings = self.log.settings
        issued, arrived = issued_at(request_id), time.time()
        deadline = arrived
        if issued is not None and issued <= arrived:
            deadline = issued + settings.flush_seconds + LOGGED_WITHIN_SECONDS
        # A writer that marked nothing for this long before the feedback came wrote all it will.
        silent = 2 * settings.flush_seconds + LOGGED_WITHIN_SECONDS
        while True:
            images = await asyncio.to_thread(self._look_up, request_id)
            if images is not None or time.time() >= deadline:
                return images, False
            if not settings.remote and await asyncio.to_thread(
                written_past, settings.directory, arrived, silent
            ):
                return await asyncio.to_thread(self._look_up, request_id), True  # a last look
            await asyncio.sleep(0.1)

    def _look_up(self, request_id: str) -> int | None:
        with self._index_lock:
            return self.index.images_of(request_id)


def feedback_problem(feedback) -> str:
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
