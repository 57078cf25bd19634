"""Riding out a tracking server (or its database) that goes away in the middle of a fit.

The start of a stage stays strict: `use_experiment`'s few retries fail it in
seconds when the server is down, before any work begins. Once a fit is under
way, the run's logging changes policy:

- what the fit logs (per-epoch metrics, system metrics, tags) goes into a
  `RunLog`: the fit only appends to it, and one thread sends it in order,
  several entries per request when it has fallen behind. A send that fails
  because the server is away (no connection, a 5xx answer such as the one a
  server without its database gives) is tried again every second, for up to
  `outage_seconds` from the first failure; then the next entry is logged at
  the next epoch's end, and the fit stops there. MLflow stores a metric once
  per (key, value, timestamp, step), so a batch that reached the server before
  the connection broke is not doubled when sent again.
- after the fit (`patient_requests`), MLflow's own retries are raised so that
  saving and registering the model, and ending the run, wait out an outage of
  the same length.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

# What one log_batch request may carry (MLflow's limits).
MAX_METRICS_PER_REQUEST = 1000
MAX_TAGS_PER_REQUEST = 100
RETRY_EVERY_SECONDS = 1.0


def transient(error: BaseException) -> bool:
    """Whether a failed request may succeed later: the server or its database was away."""
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return status >= 500 or status == 429


class RunLog:
    """An ordered buffer of a run's metrics and tags, sent by a thread of its own.

    Use it as a context manager around the fit: leaving the block normally
    waits until everything is sent (or the outage bound has passed, which
    raises); leaving it with an exception stops sending at once.
    """

    def __init__(self, run_id: str, outage_seconds: float) -> None:
        from mlflow import MlflowClient

        self.run_id = run_id
        self.outage_seconds = outage_seconds
        self._client = MlflowClient()
        self._pending: deque[tuple[list, list]] = deque()
        self._condition = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._send_all, name="run-log", daemon=True)

    def __enter__(self) -> RunLog:
        self._thread.start()
        return self

    def __exit__(self, error_type, error, _traceback) -> None:
        with self._condition:
            self._closing = True
            self._abandoned = error_type is not None
            self._condition.notify()
        if error_type is None:
            self._thread.join()
            self.raise_failure()

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        self._append(entries, [])

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._append([], [RunTag(key, str(value)) for key, value in tags.items()])

    def raise_failure(self) -> None:
        """Raise what ended the sending: an outage past the bound, or a refused request."""
        if self._failure is not None:
            raise self._failure

    def _append(self, metrics: list, tags: list) -> None:
        self.raise_failure()
        with self._condition:
            self._pending.append((metrics, tags))
            self._condition.notify()

    def _next_batch(self) -> tuple[int, list, list] | None:
        """The oldest entries that fit one request, still queued; None once closed and empty."""
        with self._condition:
            while not self._pending and not self._closing:
                self._condition.wait()
            if self._abandoned or not self._pending:
                return None
            count, metrics, tags = 0, [], []
            for entry_metrics, entry_tags in self._pending:
                if count and (
                    len(metrics) + len(entry_metrics) > MAX_METRICS_PER_REQUEST
                    or len(tags) + len(entry_tags) > MAX_TAGS_PER_REQUEST
                ):
                    break
                metrics += entry_metrics
                tags += entry_tags
                count += 1
            return count, metrics, tags

    def _send_all(self) -> None:
        away_since = None
        while (batch := self._next_batch()) is not None:
            count, metrics, tags = batch
            try:
                self._client.log_batch(self.run_id, metrics=metrics, tags=tags)
            except Exception as error:
                away_since = self._wait_or_give_up(error, away_since)
                if away_since is None:
                    return
                continue
            if away_since is not None:
                print(
                    f"MLflow is back after {time.monotonic() - away_since:.0f} s; "
                    "the run's logs kept meanwhile are sent",
                    file=sys.stderr,
                    flush=True,
                )
                away_since = None
            with self._condition:
                for _ in range(count):
                    self._pending.popleft()

    def _wait_or_give_up(self, error: Exception, away_since: float | None) -> float | None:
        """The outage's start if the send is to be tried again (after a pause), else None."""
        from mlflow.exceptions import MlflowException

        now = time.monotonic()
        if not transient(error):
            self._failure = error
            return None
        if away_since is None:
            away_since = now
            print(
                f"MLflow is away ({type(error).__name__}); training goes on and the run's "
                f"logs are kept for up to {self.outage_seconds:g} s",
                file=sys.stderr,
                flush=True,
            )
        if now - away_since >= self.outage_seconds:
            reason = str(getattr(error, "message", error)).strip().splitlines()[0]
            self._failure = MlflowException(
                f"away for more than {self.outage_seconds:g} s in the middle of the run "
                f"(mlflow.outage_seconds): {reason}"
            )
            return None
        with self._condition:
            self._condition.wait_for(lambda: self._abandoned, timeout=RETRY_EVERY_SECONDS)
            return None if self._abandoned else away_since


def buffered_system_metrics(run_log: RunLog, interval: float):
    """MLflow's system metrics monitor (the run page's tab), sampling into `run_log`.

    MLflow's own loop stops for good at the first failed request; this one
    keeps sampling through an outage and lets the RunLog deliver.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class BufferedSystemMetrics(SystemMetricsMonitor):
        def monitor(self) -> None:
            stopping = False
            while not stopping:
                self.collect_metrics()
                # A run shorter than one interval still gets its one sample.
                stopping = self._shutdown_event.wait(self.sampling_interval)
                try:
                    self.publish_metrics(self.aggregate_metrics())
                except Exception:  # the RunLog gave up; the fit reports why
                    return

        def publish_metrics(self, metrics: dict[str, float]) -> None:
            named = {f"{self._metrics_prefix}{key}": value for key, value in metrics.items()}
            run_log.metrics(named, step=self._logging_step)
            self._logging_step += 1
            for monitor in self.monitors:
                monitor.clear_metrics()

    return BufferedSystemMetrics(run_log.run_id, sampling_interval=interval)


@contextmanager
def system_metrics(run_log: RunLog, interval: float) -> Iterator[None]:
    """Sample the machine every `interval` seconds into `run_log` (0: not at all)."""
    if not interval:
        yield
        return
    monitor = buffered_system_metrics(run_log, interval)
    monitor.start()
    try:
        yield
    finally:
        monitor._shutdown_event.set()
        monitor._process.join()


def patient_retries(outage_seconds: float) -> int:
    """MLflow retries whose backoff (0, 2, 4, 8 … s) adds up to at least `outage_seconds`."""
    return min(10, max(2, math.ceil(math.log2(outage_seconds + 2))))


@contextmanager
def patient_requests(outage_seconds: float) -> Iterator[None]:
    """Within the block, each MLflow request waits out an outage of `outage_seconds`."""
    saved = {
        name: os.environ.get(name)
        for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
    }
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(patient_retries(outage_seconds))
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
