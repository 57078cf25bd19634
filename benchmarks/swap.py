"""Benchmark: what swapping the champion costs the requests around it.

Registers the project's ONNX export (models/model.onnx, from `make repro`)
twice in a temporary MLflow store, as v1 and v2, each with the known digits
a server checks a new version on; serves `models:/mnist-classifier@champion`
with `--follow-seconds 0.5` on 127.0.0.1; and keeps 8 clients sending one
image at a time without pause. First a stretch without a swap gives the p99
latency; then the alias moves between v1 and v2 several times, and every
request that was in flight from the move until the server answered with
the new version (plus one second) counts as "during a swap".

    python -m benchmarks.swap [--clients 8] [--swaps 5] [--seconds 10]

The project's own store and its champion are never touched.
"""

import argparse
import http.client
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    PROJECT,
    free_port,
    mnist_mlops,
    percentile,
    stop,
    test_images,
    wait_until,
)

MODEL = "mnist-classifier"


def register_twice(store: Path, tracking_uri: str = "") -> None:
    """v1 and v2 of the project's ONNX export, v1 champion, in a store of their own
    (or on the tracking server at `tracking_uri`)."""
    import mlflow

    from mnist_mlops.model.export import inference_session, predict_probabilities
    from mnist_mlops.model.flavors import log_classifier
    from mnist_mlops.serving.follow import known_digits

    mlflow.set_tracking_uri(tracking_uri or f"sqlite:///{store / 'mlflow.db'}")
    images, labels = test_images(200)
    onnx_file = PROJECT / "models" / "model.onnx"
    predicted = predict_probabilities(inference_session(onnx_file), images).argmax(axis=1)
    known = known_digits(images, labels, predicted)
    client = mlflow.MlflowClient()
    for _ in range(2):
        with mlflow.start_run():
            info = log_classifier(
                "onnx", onnx_file, images[:1], 1024, (images[known], labels[known])
            )
            mlflow.register_model(info.model_uri, MODEL)
    client.set_registered_model_alias(MODEL, "champion", "1")


class Clients:
    def __init__(self, port: int, count: int, body: bytes) -> None:
        self.port, self.body = port, body
        self.records: list[tuple[float, float, str, int]] = []  # start, seconds, version, status
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(count)]

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        while not self.stop.is_set():
            started = time.perf_counter()
            connection.request("POST", "/invocations", self.body, headers)
            response = connection.getresponse()
            response.read()
            seconds = time.perf_counter() - started
            record = (started, seconds, response.getheader("x-model-version", ""), response.status)
            with self.lock:
                self.records.append(record)

    def latest_version(self) -> str:
        with self.lock:
            return self.records[-1][2] if self.records else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="the stretch without a swap")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch)
        register_twice(store)
        import mlflow

        client = mlflow.MlflowClient()
        port = free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
        command = mnist_mlops(
            *("serve", "--port", str(port)),
            *("--follow-seconds", "0.5", "--log-dir", str(store / "log")),
        )
        server = subprocess.Popen(
            command, env=env, cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            body = json.dumps({"inputs": [np.zeros((28, 28), int).tolist()]}).encode()

            def ping() -> bool:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/ping")
                return connection.getresponse().status == 200

            wait_until(ping, server, "the server", seconds=60)
            clients = Clients(port, arguments.clients, body)
            for thread in clients.threads:
                thread.start()
            time.sleep(arguments.seconds)
            quiet = [seconds for _s, seconds, _v, _st in list(clients.records)]
            windows = []
            for number in range(arguments.swaps):
                target = "2" if number % 2 == 0 else "1"
                moved = time.perf_counter()
                client.set_registered_model_alias(MODEL, "champion", target)
                while clients.latest_version() != f"{MODEL}/{target}":
                    time.sleep(0.01)
                windows.append((moved, time.perf_counter() + 1.0))
                time.sleep(3)
            clients.stop.set()
            for thread in clients.threads:
                thread.join()
        finally:
            stop(server)
    records = clients.records
    during = [
        seconds
        for started, seconds, _version, _status in records
        if any(low <= started + seconds and started <= high for low, high in windows)
    ]
    failed = sum(status != 200 for *_rest, status in records)
    p99 = percentile(quiet, 99)
    print(
        f"{len(records)} requests from {arguments.clients} clients, {failed} failed; "
        f"without a swap p50 {percentile(quiet, 50) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
        f"during {arguments.swaps} swaps ({len(during)} requests) p99 "
        f"{percentile(during, 99) * 1000:.1f} ms, longest {max(during) * 1000:.1f} ms "
        f"= {max(during) / p99:.1f}× the p99 without a swap"
    )


if __name__ == "__main__":
    main()
