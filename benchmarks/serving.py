"""Benchmark: the served champion against the same model under MLflow's stock Keras flavor.

Starts two `mlflow models serve` processes on 127.0.0.1 in the same run:
  - the champion, `models:/mnist-classifier@champion` (this project's pyfunc:
    input validation on, `predict_on_batch`);
  - the Keras-flavor model that the same training run logged
    (`runs:/<run>/model`, which calls `model.predict` per request);
then sends single-image requests, first from one client in sequence, then from
a few concurrent clients, and reports p50/p99 latency and requests per second.

    python benchmarks/serving.py [--requests N] [--clients C]

It uses the project's tracking store (MLFLOW_TRACKING_URI, else mlflow.db at
the project root), so run `make repro` first.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
CHAMPION = "models:/mnist-classifier@champion"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(model_uri: str, env: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri),
        *("--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)),
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server for {model_uri} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return process, port
        except OSError:
            time.sleep(0.3)
    process.kill()
    sys.exit(f"the server for {model_uri} did not start")


def client(port: int, body: bytes, count: int, latencies: list[float]) -> None:
    """Send `count` requests on one keep-alive connection, recording each latency."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    for _ in range(count):
        started = time.perf_counter()
        connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"request failed with HTTP {response.status}")
        latencies.append(time.perf_counter() - started)
    connection.close()


def measure(port: int, body: bytes, requests: int, clients: int) -> dict:
    client(port, body, 20, [])  # warm up
    latencies: list[float] = []
    threads = [
        threading.Thread(target=client, args=(port, body, requests // clients, latencies))
        for _ in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    milliseconds = sorted(latency * 1000 for latency in latencies)
    return {
        "p50_ms": statistics.median(milliseconds),
        "p99_ms": milliseconds[min(len(milliseconds) - 1, int(0.99 * len(milliseconds)))],
        "rps": len(latencies) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    arguments = parser.parse_args()

    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT / 'mlflow.db'}")
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        TF_CPP_MIN_LOG_LEVEL="2",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    stock = f"runs:/{version.tags['run_id']}/model"

    with np.load(PROJECT / "data" / "processed" / "test.npz", allow_pickle=False) as arrays:
        image = arrays["images"][:1]
    body = json.dumps({"inputs": image.tolist()}).encode()

    results = {}
    for name, model_uri in (("champion (pyfunc)", CHAMPION), ("stock Keras flavor", stock)):
        process, port = start(model_uri, env)
        try:
            results[name] = {
                "sequential": measure(port, body, arguments.requests, 1),
                f"{arguments.clients} clients": measure(
                    port, body, arguments.requests, arguments.clients
                ),
            }
        finally:
            process.terminate()
            process.wait(timeout=30)

    print(f"champion v{version.version}; {arguments.requests} single-image requests per row")
    print(f"{'server':20} {'clients':>12} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for name, rows in results.items():
        for mode, row in rows.items():
            print(
                f"{name:20} {mode:>12} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['rps']:8.1f}"
            )
    ours, theirs = results["champion (pyfunc)"], results["stock Keras flavor"]
    print(
        f"sequential throughput: {ours['sequential']['rps'] / theirs['sequential']['rps']:.1f}x "
        f"the stock flavor (target >= 10x); champion p50 {ours['sequential']['p50_ms']:.2f} ms "
        "(target <= 5 ms)"
    )


if __name__ == "__main__":
    main()
