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

    python benchmarks/monitoring.py [--model-uri models:/mnist-classifier/N]

The model must carry a reference profile (registered by this code's evaluate
stage): run `make repro` first.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from serving import PROJECT, client, free_port, measure, start

ROUNDS = 40


def request_price(model_uri: str, requests: int, log_dir: Path) -> None:
    body = json.dumps({"inputs": [[[0.0] * 28] * 28]}).encode()
    base = [sys.executable, "-m", "mnist_mlops", "serve", "--model-uri", model_uri]
    commands = {
        "observed": [*base, "--log-dir", str(log_dir)],
        "bare": [*base, "--no-metrics", "--no-log"],
    }
    servers = {name: start(command, None, body) for name, command in commands.items()}
    try:
        ports = {name: port for name, (_process, port, _seconds) in servers.items()}
        paired: dict[str, list[float]] = {name: [] for name in ports}
        for port in ports.values():
            client(port, body, 50, [])
        for index in range(ROUNDS):
            order = list(ports.items()) if index % 2 == 0 else list(reversed(ports.items()))
            for name, port in order:
                client(port, body, requests // ROUNDS, paired[name])
        throughput: dict[str, list[float]] = {name: [] for name in ports}
        for _turn in range(3):
            for name, port in ports.items():
                throughput[name].append(measure(port, body, requests, 8)["rps"])
    finally:
        for process, _port, _seconds in servers.values():
            process.terminate()
            process.wait(timeout=30)
    p50 = {name: statistics.median(values) * 1000 for name, values in paired.items()}
    rps = {name: statistics.median(values) for name, values in throughput.items()}
    print(f"1. {requests} single-image requests each, side by side in {ROUNDS} rounds")
    for name in ports:
        print(f"   {name:9} p50 {p50[name]:.3f} ms, 8 clients {rps[name]:.0f} req/s")
    print(
        f"   observed / bare: p50 {p50['observed'] / p50['bare']:.3f} (target <= 1.05), "
        f"throughput {rps['observed'] / rps['bare']:.3f} (target >= 0.95)"
    )


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
    with np.load(PROJECT / "data" / "processed" / "test.npz") as test:
        images = test["images"].astype(np.float32)
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
    command = [
        *(sys.executable, "-m", "mnist_mlops", "monitor", "--model-uri", model_uri),
        *("--log-dir", str(log_dir), "--reports-dir", str(scratch / "reports")),
    ]
    began = time.perf_counter()
    finished = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    command_seconds = time.perf_counter() - began
    print(f"2. the monitor over {len(logged['digit'])} logged images ({result.verdict})")
    print(f"   statistics {statistics_seconds:.2f} s (target <= 2 s)")
    print(
        f"   the whole command {command_seconds:.1f} s (target <= 20 s), exit {finished.returncode}"
    )


def servers_speed(scratch: Path) -> None:
    ports = {"prometheus": free_port(), "alertmanager": free_port()}
    began = time.perf_counter()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "mnist_mlops", "monitoring"),
            *("--prometheus-port", str(ports["prometheus"])),
            *("--alertmanager-port", str(ports["alertmanager"])),
        ],
        cwd=PROJECT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ready = {}
    try:
        while len(ready) < 2 and time.perf_counter() - began < 60:
            for name, port in ports.items():
                if name in ready:
                    continue
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1).close()
                    ready[name] = time.perf_counter() - began
                except OSError:
                    pass
            time.sleep(0.02)
        time.sleep(2)
        children = psutil.Process(process.pid).children()
        memory = {child.name(): child.memory_info().rss / 2**20 for child in children}
    finally:
        process.terminate()
        process.wait(timeout=30)
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
        servers_speed(Path(scratch))


if __name__ == "__main__":
    main()
