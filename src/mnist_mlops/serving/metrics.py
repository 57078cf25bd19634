"""The model server's Prometheus metrics, served at `/metrics` on its own port.

Requests by path and status, their latency, the digits predicted, the top
probability of each answer, the inference log's rows written and dropped,
and which model is served. Prometheus scrapes each replica; its own
functions add them up.

The worker processes of one server (workers.py) keep their values in
prometheus_client's multiprocess mode, in the folder PROMETHEUS_MULTIPROC_DIR
names, and each one's `/metrics` sums them all, so one server reads as one:
`mnist_serving_worker_processes` says how many answer, and the per-process
`process_*` metrics are left out (they would describe one worker at random).
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from itertools import repeat, starmap

import numpy as np

# Paths the server answers; any other path is counted as "other", so a
# scanner sending random URLs cannot grow the number of series.
KNOWN_PATHS = ("/invocations", "/ping", "/health", "/version", "/feedback", "/metrics")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PROBABILITY_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
INFO_LABELS = ("name", "version", "run_id", "runtime", "uri")
# How often the counts of the requests answered meanwhile reach the metrics
# (and, with several workers, the folder they share).
FLUSH_SECONDS = 0.5


@dataclass(frozen=True)
class ServedModel:
    """What is served: the registered name and version (empty for a model that is not), its run."""

    uri: str
    name: str
    version: str
    run_id: str
    runtime: str


class ServerMetrics:
    """The server's metrics. A request appends what it adds to a deque; a thread moves that
    into the metrics every FLUSH_SECONDS, and a scrape first: with several workers each
    metric write is a locked write to a shared file, six a request (19 µs of its ~150)."""

    def __init__(self, model: ServedModel) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            Info,
            PlatformCollector,
            ProcessCollector,
        )

        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if not self.multiprocess:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        prefix = "mnist_serving"
        self.requests = Counter(
            f"{prefix}_requests",
            "HTTP requests answered, by path and status",
            ["path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{prefix}_request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            f"{prefix}_predictions",
            "Images classified, by predicted digit",
            ["digit"],
            registry=self.registry,
        )
        self.top_probability = Histogram(
            f"{prefix}_top_probability",
            "The predicted digit's probability, one observation per image",
            buckets=PROBABILITY_BUCKETS,
            registry=self.registry,
        )
        self.log_written = Counter(
            f"{prefix}_inference_log_rows_written",
            "Rows the inference log wrote to disk",
            registry=self.registry,
        )
        self.log_dropped = Counter(
            f"{prefix}_inference_log_rows_dropped",
            "Rows the inference log dropped (queue full or disk refusing)",
            registry=self.registry,
        )
        self.log_shipped = Counter(
            f"{prefix}_inference_log_files_shipped",
            "Files the inference log's spool copied to the object store (a log on s3://)",
            registry=self.registry,
        )
        self.log_ship_failures = Counter(
            f"{prefix}_inference_log_ship_failures",
            "Passes over the spool the object store refused or did not answer (files kept)",
            registry=self.registry,
        )
        self.feedback = Counter(
            f"{prefix}_feedback",
            "Feedback requests, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        if self.multiprocess:
            self.model = Gauge(
                f"{prefix}_model_info",
                "The model this server serves",
                INFO_LABELS,
                registry=self.registry,
                multiprocess_mode="livemax",
            )
            Gauge(
                f"{prefix}_worker_processes",
                "The server's worker processes that answer",
                registry=self.registry,
                multiprocess_mode="livesum",
            ).set(1)
        else:
            self.model = Info(
                f"{prefix}_model", "The model this server serves", registry=self.registry
            )
        self._described: dict[str, str] | None = None
        self._describe(model)
        self.swaps = Counter(
            f"{prefix}_model_swaps",
            "New versions of a followed alias: swapped in, or refused (failed to load or answer)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("swapped", "refused"):
            self.swaps.labels(outcome=outcome)
        self.webhooks = Counter(
            f"{prefix}_webhook_calls",
            "Registry webhook calls: accepted (signed; the alias is looked at), or refused",
            ["outcome"],
            registry=self.registry,
        )
        self._digits = [self.predictions.labels(digit=str(digit)) for digit in range(10)]
        # What each request adds waits in two deques (append and popleft are atomic, no lock):
        # in the server, every object a request touches is out of the cache by the next
        # request, and counting one took 4.6 µs there with a lock and dicts, 1.7 as an append.
        self._requests: deque = deque()  # (path, status, seconds, digit, top probability)
        self._answers: deque = deque()  # (digit, top probability), one per image
        self._flushing_lock = threading.Lock()  # the thread's flush and a scrape's, one at a time
        self._stop = threading.Event()
        threading.Thread(target=self._flushing, name="metrics-flush", daemon=True).start()

    def now_serving(self, model: ServedModel) -> None:
        """A swap: `model` is served from now on."""
        self.swaps.labels(outcome="swapped").inc()
        self._describe(model)

    def _describe(self, model: ServedModel) -> None:
        described = {label: getattr(model, label) for label in INFO_LABELS}
        if not self.multiprocess:
            self.model.info(described)
            return
        if self._described is not None:
            self.model.labels(**self._described).set(0)
        self.model.labels(**described).set(1)
        self._described = described

    def request(self, path: str, status: int, seconds: float, answers: list = ()) -> None:
        """A request answered and, if it succeeded, what the model answered in it (an
        `(images, predictions)` per batch scored): one append for a single image.

        Numbers only, never the answers' lists: a queued tuple of numbers is one the
        collector stops tracking, and containers kept half a second aged into full
        collections that slowed every request.
        """
        if status == 200 and len(answers) == 1 and len(answers[0][1]) == 1:
            first = answers[0][1][0]
            self._requests.append(
                (path, status, seconds, first["digit"], first["probabilities"][first["digit"]])
            )
            return
        self._requests.append((path, status, seconds, None, None))
        if status == 200:
            for _, predictions in answers:
                self.answered(predictions)

    def answered(self, predictions: list[dict]) -> None:
        for prediction in predictions:
            digit = prediction["digit"]
            self._answers.append((digit, prediction["probabilities"][digit]))

    def flush(self) -> None:
        """Move the counts of the requests answered since the last flush into the metrics."""
        with self._flushing_lock:
            self._flush()

    def _flush(self) -> None:
        # Taken in C, popleft by popleft: what is appended meanwhile waits for the next flush.
        requests = drained(self._requests)
        answers = [(digit, top) for _, _, _, digit, top in requests if digit is not None]
        answers += drained(self._answers)
        if requests:
            paths, statuses, seconds, _, _ = zip(*requests, strict=True)
            for (path, status), count in Counter(zip(paths, statuses, strict=True)).items():
                self.requests.labels(path=label_of(path), status=str(status)).inc(count)
            by_label = defaultdict(list)
            if len(set(paths)) == 1:
                by_label[label_of(paths[0])] = list(seconds)
            else:
                for path, duration in zip(paths, seconds, strict=True):
                    by_label[label_of(path)].append(duration)
            for label, durations in by_label.items():
                observe_all(self.latency.labels(path=label), durations)
        if answers:
            digits, tops = zip(*answers, strict=True)
            for digit, count in enumerate(np.bincount(digits, minlength=10)[:10].tolist()):
                if count:
                    self._digits[digit].inc(count)
            observe_all(self.top_probability, tops)

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def _flushing(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            self.flush()

    def exposition(self) -> tuple[bytes, str]:
        self.flush()
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker)
        return generate_latest(every_worker), CONTENT_TYPE_LATEST


def label_of(path: str) -> str:
    return path if path in KNOWN_PATHS else "other"


def drained(queue: deque) -> list:
    """The items in `queue` now, taken from it; any appended meanwhile stay."""
    return list(starmap(queue.popleft, repeat((), len(queue))))


def observe_all(histogram, values: list[float]) -> None:
    """`histogram.observe(value)` for each value, one write per bucket rather than per value."""
    if not values:
        return
    bounds = histogram._upper_bounds
    # The bucket of each value (+Inf's for NaN, which sorts last); bincount counts them.
    where = np.minimum(np.searchsorted(bounds, values), len(bounds) - 1)
    counts = np.bincount(where, minlength=len(bounds)).tolist()
    histogram._sum.inc(math.fsum(values))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)
