"""Benchmark: the served champion against MLflow's floor and the stock Keras flavor, in one run.

Starts, one after another, on 127.0.0.1:
  - floor: a constant-output pyfunc with the champion's signature behind
    MLflow's scoring server (`mnist-mlops serve`): what any model served this
    way costs at least;
  - champion: `models:/mnist-classifier@champion` under `mnist-mlops serve`
    (MLflow's scoring server in one process; ONNX Runtime by default);
  - champion, `mlflow models serve`: the same model under MLflow's own
    command (two processes), for its start time and memory;
  - stock Keras flavor: the Keras model that the champion's training run
    logged (`runs:/<run>/model`, which calls `model.predict` per request).
For each it measures the time from starting the command to its first answer
to a one-image request, the memory of its processes (RSS, all of them), then
single-image latency from one client in sequence and from a few at once.

    python benchmarks/serving.py [--requests N] [--clients C] [--serve-env DIR]
    python benchmarks/serving.py --proxy    # only: the champion direct and behind nginx

--proxy compares the champion served directly with the same server behind
`mnist-mlops proxy` (nginx, HTTPS), side by side (benchmarks/proxy_cost.py).

--serve-env serves the champion from another environment, such as the one
`benchmarks/environment.py --keep DIR` builds from requirements-serve.txt.
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
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

PROJECT = Path(__file__).resolve().parents[1]
CHAMPION = "models:/mnist-classifier@champion"

CONSTANT_MODEL = """
import mlflow
from mlflow.pyfunc import PythonModel

ANSWER = [{"digit": 0, "probabilities": [1.0] + [0.0] * 9}]


class Constant(PythonModel):
    def predict(self, context, model_input, params=None):
        return ANSWER * len(model_input)


mlflow.models.set_model(Constant())
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, body: bytes, timeout: float = 30) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(
            "POST", "/invocations", body=body, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def start(command: list[str], env: dict, body: bytes) -> tuple[subprocess.Popen, int, float]:
    """Start a server; return it, its port and the seconds until it first answered `body`."""
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--port" if command[0] != "mlflow" else "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = started + 180
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            sys.exit(f"{' '.join(command)} exited with {process.returncode}")
        try:
            if post(port, body, timeout=5) == 200:
                return process, port, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.02)
    process.kill()
    sys.exit(f"{' '.join(command)} did not answer")


def memory_mib(process: subprocess.Popen) -> float:
    """Resident memory of the server and every process it started."""
    parent = psutil.Process(process.pid)
    members = [parent, *parent.children(recursive=True)]
    return sum(member.memory_info().rss for member in members) / 2**20


def client(port: int, body: bytes, count: int, latencies: list[float], context=None) -> None:
    """Send `count` requests on one keep-alive connection, recording each latency.

    With an SSL `context` the connection is HTTPS (one handshake, then reused).
    """
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    headers = {"Content-Type": "application/json"}
    for _ in range(count):
        begun = time.perf_counter()
        connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"request failed with HTTP {response.status}")
        latencies.append(time.perf_counter() - begun)
    connection.close()


def measure(port: int, body: bytes, requests: int, clients: int, context=None) -> dict:
    client(port, body, 50, [], context)  # warm up
    latencies: list[float] = []
    threads = [
        threading.Thread(target=client, args=(port, body, requests // clients, latencies, context))
        for _ in range(clients)
    ]
    begun = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begun
    milliseconds = sorted(latency * 1000 for latency in latencies)
    return {
        "p50_ms": statistics.median(milliseconds),
        "p99_ms": milliseconds[min(len(milliseconds) - 1, int(0.99 * len(milliseconds)))],
        "rps": len(latencies) / elapsed,
    }


def floor_model(directory: Path) -> str:
    """Save the constant-output pyfunc, with the champion's signature, as models from code."""
    import mlflow

    from mnist_mlops.model.flavors import classifier_signature

    code = directory / "constant.py"
    code.write_text(CONSTANT_MODEL)
    path = directory / "floor"
    mlflow.pyfunc.save_model(path, python_model=str(code), signature=classifier_signature())
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--starts", type=int, default=3, help="times each server is started")
    parser.add_argument("--serve-env", type=Path, help="serve the champion from this venv")
    parser.add_argument("--proxy", action="store_true", help="only the proxy's cost")
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
    runtime = version.tags.get("serving.runtime", "keras")

    with np.load(PROJECT / "data" / "processed" / "test.npz", allow_pickle=False) as arrays:
        image = arrays["images"][:1]
    body = json.dumps({"inputs": image.tolist()}).encode()

    ours = [str(Path(sys.executable).parent / "mnist-mlops"), "serve"]
    if arguments.serve_env:
        ours = [str(arguments.serve_env.resolve() / "bin" / "mnist-mlops"), "serve"]
    mlflow_serve = [*("mlflow", "models", "serve", "--env-manager", "local", "-h", "127.0.0.1")]
    if arguments.proxy:
        from proxy_cost import compare

        compare([*ours, "--model-uri", CHAMPION], env, body, arguments.requests, arguments.clients)
        return

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        servers = {
            "floor (constant pyfunc)": [*ours, "--model-uri", floor_model(Path(scratch))],
            f"champion ({runtime})": [*ours, "--model-uri", CHAMPION],
            "champion, mlflow serve": [*mlflow_serve, "-m", CHAMPION],
            "stock Keras flavor": [*mlflow_serve, "-m", stock],
        }
        # Starting is timed `--starts` times per server (the median counts);
        # latency is measured on the last start.
        for name, command in servers.items():
            start_times = []
            for attempt in range(arguments.starts):
                process, port, start_seconds = start(command, env, body)
                start_times.append(start_seconds)
                if attempt < arguments.starts - 1:
                    process.terminate()
                    process.wait(timeout=30)
            # The stock flavor answers ~20 requests a second: a quarter of the count will do.
            requests = arguments.requests // (4 if name == "stock Keras flavor" else 1)
            try:
                row = {"start_s": statistics.median(start_times)}
                row["sequential"] = measure(port, body, requests, 1)
                row["concurrent"] = measure(port, body, requests, arguments.clients)
                row["memory_mib"] = memory_mib(process)
                results[name] = row
            finally:
                process.terminate()
                process.wait(timeout=30)

        # The floor and the champion once more, side by side: rounds of
        # sequential requests in turn, so that the machine's drift hits both.
        floor_command = servers["floor (constant pyfunc)"]
        champion_command = servers[f"champion ({runtime})"]
        paired: dict[str, list[float]] = {"floor": [], "champion": []}
        floor_process, floor_port, _ = start(floor_command, env, body)
        champion_process, champion_port, _ = start(champion_command, env, body)
        try:
            for port in (floor_port, champion_port):
                client(port, body, 50, [])
            # Many short rounds, each in the other order from the last, so that
            # neither server keeps the machine's better or worse moments.
            rounds = 40
            for index in range(rounds):
                pair = [(floor_port, "floor"), (champion_port, "champion")]
                for port, name in pair if index % 2 == 0 else reversed(pair):
                    client(port, body, arguments.requests // rounds, paired[name])
        finally:
            for process in (floor_process, champion_process):
                process.terminate()
                process.wait(timeout=30)

    print(
        f"champion v{version.version} ({runtime}); {arguments.requests} single-image requests "
        f"per row; concurrent = {arguments.clients} clients"
    )
    print(
        f"{'server':26} {'start s':>8} {'memory MiB':>11} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'req/s':>7} {'conc. p50':>10} {'conc. req/s':>12}"
    )
    for name, row in results.items():
        sequential, concurrent = row["sequential"], row["concurrent"]
        print(
            f"{name:26} {row['start_s']:8.2f} {row['memory_mib']:11.0f} "
            f"{sequential['p50_ms']:7.2f} {sequential['p99_ms']:7.2f} {sequential['rps']:7.1f} "
            f"{concurrent['p50_ms']:10.2f} {concurrent['rps']:12.1f}"
        )
    champion = results[f"champion ({runtime})"]
    keras_flavor = results["stock Keras flavor"]
    floor_p50 = statistics.median(paired["floor"]) * 1000
    champion_p50 = statistics.median(paired["champion"]) * 1000
    print(
        f"side by side, {len(paired['floor'])} requests each: floor p50 {floor_p50:.2f} ms, "
        f"champion p50 {champion_p50:.2f} ms: {champion_p50 / floor_p50:.2f}x the floor "
        "(target <= 1.25)"
    )
    print(
        f"champion vs stock Keras flavor, sequential throughput: "
        f"{champion['sequential']['rps'] / keras_flavor['sequential']['rps']:.1f}x (target >= 20x)"
    )
    print(
        f"champion start to first answer: {champion['start_s']:.2f} s (target <= 2.5 s); "
        f"memory {champion['memory_mib']:.0f} MiB (target <= 250 MB)"
    )


if __name__ == "__main__":
    main()
