"""Benchmark: how soon a server follows a moved champion, told by webhook or looking each period.

Registers the project's ONNX export (models/model.onnx, from `make repro`)
twice, v1 and v2, on a plain `mlflow server` over SQLite on 127.0.0.1 with
the webhook settings of `mnist-mlops tracking-server`; serves
`models:/mnist-classifier@champion` with 2 workers and `--follow-seconds`
(30 s, the default); and moves the alias `--moves` times, first with the
server's webhook, then with `--no-webhook` (the follower looks every period
alone). A move's delay runs from the alias set to the first of 10 answers in
a row from the new version, so that both workers serve it.

    python -m benchmarks.webhook [--moves 10] [--follow-seconds 30]

The project's own store and its champion are never touched. (On the team
server each request also pays its login check, about 0.2 s here, and a load
makes about ten: see docs/serving.md.)
"""

import argparse
import http.client
import json
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import free_port, mlflow_server, mnist_mlops, stop, wait_until
from benchmarks.swap import MODEL, register_twice


def version_answering(port: int, body: bytes) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.getheader("x-model-version", "")
    finally:
        connection.close()


def delays(url: str, store: Path, moves: int, follow: float, webhook: bool) -> list[float]:
    """Seconds from each alias move to 10 answers in a row from the new version."""
    import mlflow

    port = free_port()
    command = mnist_mlops(
        *("serve", "--port", str(port), "--workers", "2", "--no-log"),
        *("--follow-seconds", str(follow), *([] if webhook else ["--no-webhook"])),
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    with open(store / f"serve-{webhook}.log", "w") as log:
        server = subprocess.Popen(command, env=env, cwd=store, stdout=log, stderr=log)
    body = json.dumps({"inputs": [np.zeros((28, 28), int).tolist()]}).encode()
    client, found = mlflow.MlflowClient(url), []
    try:
        wait_until(lambda: version_answering(port, body) != "", server, "the server", 120)
        if webhook:
            told = lambda: "told of alias moves" in (store / "serve-True.log").read_text()  # noqa: E731
            wait_until(told, server, "the webhook's registration", 120)
        current = client.get_model_version_by_alias(MODEL, "champion").version
        for _ in range(moves):
            target = "2" if current == "1" else "1"
            moved, in_a_row = time.perf_counter(), 0
            client.set_registered_model_alias(MODEL, "champion", target)
            while in_a_row < 10:
                in_a_row = (
                    in_a_row + 1 if version_answering(port, body) == f"{MODEL}/{target}" else 0
                )
                time.sleep(0 if in_a_row else 0.02)
            found.append(time.perf_counter() - moved)
            current = target
            time.sleep(1)
    finally:
        stop(server)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--moves", type=int, default=10)
    parser.add_argument("--follow-seconds", type=float, default=30.0)
    arguments = parser.parse_args()
    from mnist_mlops.team.server import webhook_settings

    webhook_settings(secrets.token_hex(16))
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch)
        with mlflow_server(store / "server", dict(os.environ)) as url:
            register_twice(store, url)
            results = {
                name: delays(url, store, arguments.moves, arguments.follow_seconds, webhook)
                for name, webhook in (("webhook", True), ("polling", False))
            }
    for name, values in results.items():
        print(
            f"{name:8} {len(values)} moves: median {statistics.median(values):.2f} s, "
            f"max {max(values):.2f} s ({', '.join(f'{value:.1f}' for value in values)})"
        )
    ratio = statistics.median(results["polling"]) / statistics.median(results["webhook"])
    print(f"polling/webhook median: {ratio:.1f}× (follow period {arguments.follow_seconds:g} s)")


if __name__ == "__main__":
    main()
