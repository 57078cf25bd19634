"""Benchmark: what watching the served model costs, and how fast the monitor and its servers are.

In one run, on 127.0.0.1:
  1. the price at the request: the registered model under `mnist-mlops serve`
     with metrics and the inference log on, against the same server with
     both off (`--no-metrics --no-log`); single-image requests side by side in
     alternating rounds (p50), then 8 clients at once against each in turn
     (throughput, the median of 3 turns);
  2. the monitor over --rows logged images (the test split repeated, with the
     model's real answers): the statistics alone, then the whole command
     (reading, features, statistics, report, MLflow run);
  3. Prometheus and Alertmanager under `mnist-mlops monitoring`: seconds to
     ready, and their memory.

    python -m benchmarks.monitoring [--model-uri models:/mnist-classifier/N]

The model must carry a reference profile (registered by this code's evaluate
stage): run `make repro` first.
"""

import argparse
import base64
import json
import statistics
import subprocess
import tempfile
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import (
    PROJECT,
    alternating,
    client,
    free_port,
    measure,
    mnist_mlops,
    ratio_line,
    start_server,
    stop,
    test_images,
    wait_until,
)

ROUNDS = 40


def request_price(model_uri: str, requests: int, log_dir: Path) -> None:
    body = json.dumps({"inputs": [[[0.0] * 28] * 28]}).encode()
    base = mnist_mlops("serve", "--model-uri", model_uri)
    commands = {
        "observed": [*base, "--log-dir", str(log_dir)],
        "bare": [*base, "--no-metrics", "--no-log"],
    }
    servers = {name: start_server(command, None, body) for name, command in commands.items()}
    try:
        ports = {name: port for name, (_process, port, _seconds) in servers.items()}
        for port in ports.values():
            client(port, body, 50, [])

        def round_of(name: str) -> list[float]:
            latencies: list[float] = []
            client(ports[name], body, requests // ROUNDS, latencies)
            return latencies

        paired = alternating(ROUNDS, list(ports), round_of)
        throughput = alternating(
            3, list(ports), lambda name: measure(ports[name], body, requests, 8)["rps"]
        )
    finally:
        for process, _port, _seconds in servers.values():
            stop(process)
    print(f"1. {requests} single-image requests each, side by side in {ROUNDS} rounds")
    for name in ports:
        print(
            f"   {name:9} p50 {statistics.median(paired[name]) * 1000:.3f} ms, "
            f"8 clients {statistics.median(throughput[name]):.0f} req/s"
        )
    print(f"   p50, {ratio_line(paired, 'observed', 'bare', '<= 1.05')}")
    print(f"   req/s, {ratio_line(throughput, 'observed', 'bare', '>= 0.95')}")


def monitor_speed(model_uri: str, rows: int, scratch: Path) -> None:
    import mlflow

    from mnist_mlops.model.export import inference_session, predict_probabilities
    from mnist_mlops.monitoring.drift import check
    from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings
    from mnist_mlops.monitoring.log_files import read_rows
    from mnist_mlops.monitoring.monitor import fetch_reference
    from mnist_mlops.tracking.registry import registered_version
    from mnist_mlops.tracking.store import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    version = registered_version(model_uri)
    images = test_images()[0].astype(np.float32)
    probabilities = predict_probabilities(
        inference_session(PROJECT / "models" / "model.onnx"), images
    )
    log_dir = scratch / "log"
    log = InferenceLog(
        LogSettings(log_dir, queue_requests=10**6), version.name, str(version.version)
    )
    answers = [{"digit": int(row.argmax()), "probabilities": row.tolist()} for row in probabilities]
    for index in range(rows // 10):
        position = index * 10 % len(images)
        log.submit_rows(
            f"r{index}", images[position : position + 10], answers[position : position + 10]
        )
    log.close(timeout=600)
    logged = read_rows(log_dir)
    reference = fetch_reference(version.run_id, str(version.version))
    began = time.perf_counter()
    result = check(
        logged["features"], logged["digit"], logged["probabilities"].max(axis=1), reference
    )
    statistics_seconds = time.perf_counter() - began
    command = mnist_mlops(
        *("monitor", "--model-uri", model_uri),
        *("--log-dir", str(log_dir), "--reports-dir", str(scratch / "reports")),
    )
    began = time.perf_counter()
    finished = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    command_seconds = time.perf_counter() - began
    print(f"2. the monitor over {len(logged['digit'])} logged images ({result.verdict})")
    print(f"   statistics {statistics_seconds:.2f} s (target <= 2 s)")
    print(
        f"   the whole command {command_seconds:.1f} s (target <= 20 s), exit {finished.returncode}"
    )


def ready_request(port: int) -> urllib.request.Request:
    """`/-/ready` with the servers' login (the password file the command made)."""
    from mnist_mlops.monitoring.alerting import PASSWORD_FILE, USERNAME, login

    token = base64.b64encode(f"{USERNAME}:{login(PROJECT / PASSWORD_FILE)}".encode()).decode()
    return urllib.request.Request(
        f"http://127.0.0.1:{port}/-/ready", headers={"Authorization": f"Basic {token}"}
    )


def servers_speed() -> None:
    ports = {"prometheus": free_port(), "alertmanager": free_port()}
    began = time.perf_counter()
    process = subprocess.Popen(
        mnist_mlops(
            "monitoring",
            *("--prometheus-port", str(ports["prometheus"])),
            *("--alertmanager-port", str(ports["alertmanager"])),
        ),
        cwd=PROJECT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ready = {}
    try:

        def both_ready() -> bool:
            for name, port in ports.items():
                if name not in ready:
                    with suppress(OSError):
                        urllib.request.urlopen(ready_request(port), timeout=2).close()
                        ready[name] = time.perf_counter() - began
            return len(ready) == len(ports)

        wait_until(both_ready, process, "mnist-mlops monitoring", seconds=60)
        time.sleep(2)
        children = psutil.Process(process.pid).children()
        memory = {child.name(): child.memory_info().rss / 2**20 for child in children}
    finally:
        stop(process)
    print("3. mnist-monitoring's servers, from the command's start")
    for name, seconds in ready.items():
        print(f"   {name} ready after {seconds:.2f} s")
    for name, mebibytes in memory.items():
        print(f"   {name}: {mebibytes:.0f} MiB resident")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="models:/mnist-classifier@champion")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=100_000)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        request_price(arguments.model_uri, arguments.requests, Path(scratch) / "served-log")
        monitor_speed(arguments.model_uri, arguments.rows, Path(scratch))
        servers_speed()


if __name__ == "__main__":
    main()
