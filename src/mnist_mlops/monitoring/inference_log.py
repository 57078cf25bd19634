"""The inference log: what the served model was asked, what it answered, and the true digits later.

One folder holds it, shared by every server process that writes into it. Each process is a
writer with an id of its own (host, pid, start time), and every file it writes appears complete
under its final name or not at all (written under a temporary name, then renamed):

- `rows-WRITER-SEQ.npz`: the images scored in one flush interval (≤ 1 s by default): request id,
  position in the request, time, predicted digit, the ten probabilities, and the image's raw
  28×28 uint8 pixels, or, with pixels turned off, only its features (the reader computes them
  from the pixels: log_files.with_features); the served model's name and version once per file;
- `feedback-WRITER-SEQ.npz`: true digits, by request id and position;
- `rows-WRITER-FIRST-LAST.npz` (and `feedback-…`): a writer's parts merged into one segment
  once they reach `segment_bytes` or `segment_seconds` (in a folder: segments.py);
- `written-WRITER`, in a folder: how far the writer has written (log_files.py).

A reader takes a merged segment instead of the parts it covers, so a writer killed between
writing a segment and removing its parts duplicates nothing. With the log on an object store
(`s3://…`), files are written to a local spool first and shipped from there by a thread of their
own (spool.py). Files older than `retention_hours` are removed by whichever writer looks. The
request path only enqueues (`submit_rows`, `submit_feedback`); a thread writes. A full queue or
a disk that refuses drops rows and counts them, and the request still succeeds.
"""

from __future__ import annotations

import collections
import contextlib
import random
import re
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from mnist_mlops.atomic import atomic_path
from mnist_mlops.monitoring.log_files import (
    FEEDBACK,
    ROWS,
    feedback_arrays,
    mark_written,
    merge_parts,
    remove_expired,
    save_feedback,
    writer_id,
)
from mnist_mlops.monitoring.log_rows import RecentRequests, Scratch, rows_arrays
from mnist_mlops.monitoring.log_store import is_remote, location, store_of
from mnist_mlops.monitoring.spool import Shipper

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
WARNING_INTERVAL_SECONDS = 60
FULL = "the inference log's queue is full"


@dataclass(frozen=True)
class LogSettings:
    """Where the log goes and how much of the traffic it keeps."""

    directory: Path | str  # a folder, or an s3:// URL
    sample_rate: float = 1.0
    pixels: bool = True
    flush_seconds: float = 1.0
    queue_requests: int = 10_000
    segment_bytes: int = 32 * 1024 * 1024
    segment_seconds: float = 3600.0
    retention_hours: float = 24 * 7
    # With the log on an object store: the local folder files wait in, and its bound.
    spool: Path | None = None
    spool_bytes: int = 1024**3

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", location(str(self.directory)))
        if self.spool is not None:
            object.__setattr__(self, "spool", Path(self.spool))
        if self.remote and self.spool is None:
            raise ValueError(f"a log on {self.directory} needs a local spool folder")
        if not 0 <= self.sample_rate <= 1:
            raise ValueError(f"the sample rate must be in 0–1, got {self.sample_rate}")
        positive = ("flush_seconds", "queue_requests", "segment_bytes", "segment_seconds")
        for name in (*positive, "spool_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.retention_hours <= 0:
            raise ValueError(f"retention_hours must be positive, got {self.retention_hours}")

    @property
    def remote(self) -> bool:
        return is_remote(self.directory)

    @property
    def local(self) -> Path:
        """The folder this server writes into: the log's own, or its spool."""
        return self.spool if self.remote else self.directory


class InferenceLog:
    """A writer thread behind a bounded queue; `close()` writes what is still queued."""

    def __init__(
        self,
        settings: LogSettings,
        model_name: str,
        model_version: str,
        on_written: Callable[[int], None] = lambda rows: None,
        on_dropped: Callable[[int], None] = lambda rows: None,
        on_shipped: Callable[[int], None] = lambda files: None,
        on_ship_failed: Callable[[int], None] = lambda passes: None,
    ) -> None:
        self.settings = settings
        self.model_name, self.model_version = model_name, model_version
        self.on_written, self.on_dropped = on_written, on_dropped
        self.writer = writer_id()
        # A deque, not a queue.Queue: appending takes no lock and wakes no thread (a wake-up
        # per request cost 7 % of the throughput with 8 clients); drained once per flush.
        self._pending: collections.deque = collections.deque()
        self._sample_rate, self._queue_requests = settings.sample_rate, settings.queue_requests
        self.recent, self._scratch = RecentRequests(), Scratch()  # log_rows.py
        self._stop = threading.Event()
        self._sequence = {ROWS: 0, FEEDBACK: 0}
        self._last_warning = 0.0
        self._last_housekeeping, self._tidy_every = 0.0, min(60, settings.flush_seconds * 10)
        self._shipper = None
        if settings.remote:
            # Opened here, so that missing keys or a bad URL stop the server at its start.
            self._shipper = Shipper(
                store_of(settings.local),
                store_of(settings.directory),
                self._tidy,
                self._warn,
                counted=(on_shipped, on_ship_failed),
            )
        else:  # Before any request: feedback waits only for writers it knows by their marks.
            with contextlib.suppress(OSError):  # a folder that refuses: the first flush says so
                mark_written(settings.directory, self.writer, time.time())
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()

    def submit_rows(  # the request path: enqueue and return
        self,
        request_id: str,
        images: np.ndarray,
        answers: list[dict],
        version: str | None = None,
        client_request_id: str = "",
    ) -> bool:
        """Queue one request's images and the model's answers (digit and probabilities each).

        `version` answered (a server following an alias swaps them); by default the log's
        own. `client_request_id` is the client's own id for the request, if it gave one.
        False when the request was sampled out or its rows dropped.
        """
        if self._sample_rate < 1 and random.random() >= self._sample_rate:
            return False
        version = self.model_version if version is None else version
        # One flat tuple waits for the writer: its fields, then every image's probabilities.
        # Never the answers' dicts and lists: the collector untracks such a tuple at its first
        # pass, never a list, and aging made every request slower.
        if len(answers) == 1:
            probabilities = answers[0]["probabilities"]
        else:
            probabilities = chain.from_iterable(answer["probabilities"] for answer in answers)
        if len(self._pending) >= self._queue_requests:
            self._dropped(len(images), FULL)
            return False
        self._pending.append(
            (ROWS, request_id, time.time(), images, version, client_request_id, *probabilities)
        )
        return True

    def images_of(self, request_id: str) -> int | None:
        """How many images a request this log took lately had (queued or written); or None."""
        found = None
        for item in list(self._pending):
            if item[0] == ROWS and item[1] == request_id:
                found = len(item[3])
        return self.recent.get(request_id) if found is None else found

    def submit_feedback(self, request_id: str, digits: list[int]) -> bool:
        if len(self._pending) >= self._queue_requests:
            self._dropped(0, FULL)
            return False
        self._pending.append((FEEDBACK, request_id, time.time(), digits))
        return True

    def close(self, timeout: float = 30) -> None:
        """Write everything queued, then stop the thread (and ship what the store will take)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._shipper is not None:
            self._shipper.close(timeout)

    def _run(self) -> None:  # the writer thread
        stopping = False
        while not stopping:
            stopping = self._stop.wait(self.settings.flush_seconds)
            taken = time.time()
            # Remembered before they leave the queue: `images_of` looks in the queue first.
            batch = list(self._pending)
            self.recent.add(batch)
            for _ in range(len(batch)):
                self._pending.popleft()
            self._write(batch)
            if self._shipper is not None:
                self._shipper.wake()
                continue
            self._mark(taken)
            if time.monotonic() - self._last_housekeeping >= self._tidy_every:
                self._last_housekeeping = time.monotonic()
                self._tidy()

    def _mark(self, taken: float) -> None:
        try:
            mark_written(self.settings.directory, self.writer, taken)
        except OSError as error:
            self._warn(f"cannot mark how far the inference log is written: {error}")

    def _write(self, batch: list[tuple]) -> None:
        # One file per model version: a file names the version that answered its rows.
        by_version: dict[str, list[tuple]] = {}
        for item in batch:
            if item[0] == ROWS:
                by_version.setdefault(item[4], []).append(item)
        feedback = [item for item in batch if item[0] == FEEDBACK]
        for version, rows in by_version.items():
            count = sum(len(item[3]) for item in rows)
            try:
                pixels = self.settings.pixels
                self._save(ROWS, rows_arrays(rows, self._scratch, self.model_name, version, pixels))
                self.on_written(count)
            except (OSError, ValueError) as error:
                self._dropped(count, f"cannot write the inference log: {error}")
        if feedback:
            try:
                self._save(FEEDBACK, feedback_arrays(feedback))
            except (OSError, ValueError) as error:
                self._warn(f"cannot write feedback to the inference log: {error}; it is dropped")

    def _save(self, kind: str, arrays: dict[str, np.ndarray]) -> None:
        if self._shipper is not None and self._shipper.backlog() >= self.settings.spool_bytes:
            raise OSError(f"the spool {self.settings.local} is full (the store is away)")
        self._sequence[kind] += 1
        name = f"{kind}-{self.writer}-{self._sequence[kind]:08d}.npz"
        # Raw pixels are what people sent: 0600 files in a 0700 folder.
        with (
            atomic_path(self.settings.local / name, private=True) as temporary,
            open(temporary, "wb") as stream,
        ):
            np.savez(stream, **arrays)

    def _dropped(self, rows: int, reason: str) -> None:
        self.on_dropped(rows)
        self._warn(f"{reason}; rows are dropped" if rows else reason)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARNING_INTERVAL_SECONDS:
            self._last_warning = now
            print(f"mnist-mlops serve: warning: {message}", file=sys.stderr)

    def _tidy(self) -> None:
        """Merge this writer's parts and remove expired files where the log lives (and spool)."""
        try:
            for kind in (ROWS, FEEDBACK):
                merge_parts(
                    self.settings.directory,
                    self.writer,
                    kind,
                    self.settings.segment_bytes,
                    self.settings.segment_seconds,
                )
            remove_expired(self.settings.directory, self.settings.retention_hours)
            if self.settings.remote:
                remove_expired(self.settings.local, self.settings.retention_hours)
        except (OSError, ValueError, zipfile.BadZipFile) as error:  # a damaged part stays
            self._warn(f"cannot tidy the inference log: {error}")


__all__ = ["InferenceLog", "LogSettings", "merge_parts", "save_feedback", "writer_id"]
