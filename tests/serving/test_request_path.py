"""What a request leaves behind in its process: its counts, and the log's memory of its id."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings
from mnist_mlops.monitoring.log_rows import RecentRequests
from mnist_mlops.serving.metrics import ServedModel, ServerMetrics

THREADS, REQUESTS = 4, 5_000


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    body, _ = metrics.exposition()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_counts_added_while_the_flush_thread_and_scrapes_run_are_each_counted_once(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = ServerMetrics(ServedModel("models:/mnist@champion", "mnist", "3", "run", "onnx"))
    done = threading.Event()
    expected = [Counter() for _ in range(THREADS)]

    def scraping() -> None:
        while not done.is_set():
            metrics.exposition()

    def serving(thread: int) -> None:
        for number in range(REQUESTS):
            digit = (thread + number) % 10
            probabilities = [0.01] * 10
            probabilities[digit] = 0.91
            answer = {"digit": digit, "probabilities": probabilities}
            path = "/invocations" if number % 5 else "/no-such-path"
            metrics.request(path, 200, 0.002, [(None, [answer])])
            expected[thread][digit] += 1
            if number % 10 == 0:  # failed after the model answered: its answer is not counted
                metrics.request("/invocations", 500, 0.3, [(None, [answer])])
            if number % 50 == 0:  # two batches in one request, three images
                metrics.request(
                    "/invocations", 200, 0.002, [(None, [answer, answer]), (None, [answer])]
                )
                expected[thread][digit] += 3

    scraper = threading.Thread(target=scraping)
    scraper.start()
    servers = [threading.Thread(target=serving, args=(thread,)) for thread in range(THREADS)]
    for server in servers:
        server.start()
    for server in servers:
        server.join()
    done.set()
    scraper.join()
    metrics.close()

    counted = samples(metrics)
    total = THREADS * REQUESTS
    requests = "mnist_serving_requests_total"
    assert (
        counted[(requests, (("path", "/invocations"), ("status", "200")))]
        == total * 4 / 5 + total / 50
    )
    assert counted[(requests, (("path", "other"), ("status", "200")))] == total / 5
    assert counted[(requests, (("path", "/invocations"), ("status", "500")))] == total / 10
    images = sum(expected, Counter())
    for digit in range(10):
        assert (
            counted[("mnist_serving_predictions_total", (("digit", str(digit)),))] == images[digit]
        )
    top = "mnist_serving_top_probability"
    assert counted[(f"{top}_count", ())] == images.total() == total + 3 * total / 50
    assert counted[(f"{top}_bucket", (("le", "0.9"),))] == 0
    assert counted[(f"{top}_bucket", (("le", "0.95"),))] == images.total()
    assert counted[(f"{top}_sum", ())] == pytest.approx(0.91 * images.total())
    latency = "mnist_serving_request_duration_seconds"
    assert counted[(f"{latency}_count", (("path", "/invocations"),))] == total * (
        4 / 5 + 1 / 10 + 1 / 50
    )
    assert counted[(f"{latency}_bucket", (("le", "0.0025"), ("path", "other")))] == total / 5
    assert counted[(f"{latency}_bucket", (("le", "0.25"), ("path", "/invocations")))] == total * (
        4 / 5 + 1 / 50
    )


def test_a_log_remembers_what_it_queued_and_at_least_the_last_half_of_its_window(tmp_path):
    log = InferenceLog(LogSettings(tmp_path / "log", flush_seconds=0.05), "mnist", "1")
    log.recent = RecentRequests(most=10)
    try:
        for number in range(1, 24):
            images = np.zeros((number % 3 + 1, 28, 28), np.float32)
            answers = [{"digit": 0, "probabilities": [1.0] + [0.0] * 9}] * len(images)
            assert log.submit_rows(f"request-{number}", images, answers)
            # Found at once, queued or written: feedback may come the moment the answer does.
            assert log.images_of(f"request-{number}") == number % 3 + 1
            if number % 4 == 0:
                wait_until_written(log)
                remembered = [n for n in range(1, number + 1) if log.images_of(f"request-{n}")]
                assert len(remembered) <= 10
                assert remembered == list(range(number - len(remembered) + 1, number + 1))
                assert len(remembered) >= min(number, 5)
        assert log.images_of("request-1") is None
        assert log.images_of("never-sent") is None
    finally:
        log.close()


def wait_until_written(log: InferenceLog) -> None:
    deadline = time.monotonic() + 30
    while log._pending:
        assert time.monotonic() < deadline, "the writer took nothing from its queue"
        time.sleep(0.01)
