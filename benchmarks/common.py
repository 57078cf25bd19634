"""What every benchmark needs: the project, ports, servers, processes, timing, and the
alternating-rounds harness with its ratio report.

The benchmarks import this module and the project's package, never each other
and never the tests.
"""

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
PROCESSED = PROJECT / "data" / "processed"
CHAMPION = "models:/mnist-classifier@champion"


# The project and its commands


def mnist_mlops(*arguments: str) -> list[str]:
    """The project's command line in this interpreter."""
    return [sys.executable, "-m", "mnist_mlops", *arguments]


def project_env(**extra: str) -> dict[str, str]:
    """This environment with the venv first on PATH, TensorFlow's logs and telemetry off."""
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        TF_CPP_MIN_LOG_LEVEL="2",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    env.update(extra)
    return env


def needs_processed_data() -> None:
    if not (PROCESSED / "manifest.json").exists():
        sys.exit("data/processed is missing: run `make repro` (with MNIST_MIRROR) first")


def test_images(count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The processed test split's first `count` images and labels (all by default)."""
    with np.load(PROCESSED / "test.npz", allow_pickle=False) as test:
        return test["images"][:count], test["labels"][:count]


def one_image_body() -> bytes:
    """A scoring request of the test split's first image, in MLflow's `inputs` format."""
    return json.dumps({"inputs": test_images(1)[0].tolist()}).encode()


def timed(command: list[str], cwd: Path | None = None, env: dict | None = None):
    """Run `command` to completion; (seconds, stdout). A failure ends the benchmark."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


# Ports and processes


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65536:
            continue
        try:
            for port in range(base + 1, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def stop(process: subprocess.Popen, timeout: float = 60) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, what: str, seconds=120):
    """Poll `ready` until it holds; end the benchmark if `process` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if ready():
                return
        except (OSError, http.client.HTTPException):
            pass
        if process.poll() is not None:
            sys.exit(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            stop(process)
            sys.exit(f"{what} did not become ready in {seconds} s")
        time.sleep(0.02)


def answers(url: str, context=None) -> bool:
    """Whether a GET of `url` answers 2xx."""
    with urllib.request.urlopen(url, timeout=2, context=context):
        return True


def process_tree(pid: int, children: bool = True) -> list:
    """Process `pid` (psutil) and, by default, every process below it."""
    import psutil

    parent = psutil.Process(pid)
    return [parent, *(parent.children(recursive=True) if children else ())]


def resident_mib(pid: int, children: bool = True) -> float:
    """Resident memory of process `pid` (and, by default, of every process below it)."""
    return sum(member.memory_info().rss for member in process_tree(pid, children)) / 2**20


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) of process `pid` and of every process below it."""
    return sum(sum(member.cpu_times()[:2]) for member in process_tree(pid))


def wait_quiet(pid: int, seconds: float = 60) -> None:
    """Wait until `pid` and its children idle (< 0.05 CPU-s in 0.5 s): every worker has loaded."""
    deadline, used = time.monotonic() + seconds, cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        used, before = cpu_seconds(pid), used
        if used - before < 0.05:
            return


def pid_serving(port: int) -> int:
    """The process whose command line serves on `port` (a replica the proxy started)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in arguments and str(port).encode() in arguments:
                return int(entry.name)
    sys.exit(f"no server on port {port}")


@contextmanager
def mlflow_server(
    folder: Path, env: dict | None = None, destination: str | None = None, port: int | None = None
) -> Iterator[str]:
    """A plain `mlflow server` on 127.0.0.1 over a SQLite store in `folder`; yields its URL."""
    port = port or free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--workers", "1"),
        *("--artifacts-destination", destination or str(folder / "artifacts")),
    ]
    env = {**(env or project_env()), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.log", "a") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{url}/health"), server, f"mlflow server ({folder})")
        yield url
    finally:
        stop(server)


# Scoring requests over HTTP


def post(port: int, body: bytes, timeout: float = 30) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def start_server(command: list[str], env: dict | None, body: bytes):
    """Start a model server on a free port; (process, port, seconds to its first 200 to `body`)."""
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--port" if command[0] != "mlflow" else "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: post(port, body, timeout=5) == 200, process, command[0], seconds=180)
    return process, port, time.perf_counter() - started


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
    """p50, p99 (ms) and requests/s of `requests` sent by `clients` at once, after a warm-up."""
    client(port, body, 50, [], context)
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
    return {
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "rps": len(latencies) / elapsed,
    }


# Timing and the alternating-rounds harness


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(np.asarray(values), share))


def spread(values: list[float], unit: str = "s") -> str:
    low, high = min(values), max(values)
    return f"median {statistics.median(values):.2f} {unit}, range {low:.2f}–{high:.2f}"


def alternating(rounds: int, names: list[str], step: Callable[[str], list[float] | float]):
    """Samples of each of `names`, taken in `rounds` rounds in turn, each round in the other
    order from the last, so that the machine's better and worse moments hit every one alike.

    `step(name)` takes one round's samples (a number or a list of them).
    """
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            taken = step(name)
            samples[name].extend(taken if isinstance(taken, list) else [taken])
    return samples


def ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The ratio of the medians of two names' samples."""
    return statistics.median(samples[numerator]) / statistics.median(samples[denominator])


def ratio_line(samples, numerator: str, denominator: str, target: str = "") -> str:
    """One line of the report: each median, and their ratio against the `target`."""
    medians = {name: statistics.median(samples[name]) for name in (numerator, denominator)}
    shown = ", ".join(f"{name} {value:.4g}" for name, value in medians.items())
    goal = f" (target {target})" if target else ""
    value = ratio(samples, numerator, denominator)
    return f"{numerator} / {denominator}: {value:.3f}{goal}; medians {shown}"
