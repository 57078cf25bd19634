"""Benchmark: one replica of the model server against two behind the proxy, and a failover.

Serves the project's champion (from `make repro`) with `mnist-mlops proxy
model --replicas N` (what `make serve REPLICAS=N` runs), HTTPS on 127.0.0.1,
certificates made for the run, the inference log in a temporary folder.
8 clients send one image at a time without pause, over kept-alive
connections, for --seconds: requests per second and p99, with 1 and with 2
replicas. Then, with 2, one replica is SIGKILLed after a third of the time:
failed requests and the slowest answer after the kill.

    python -m benchmarks.replicas [--clients 8] [--seconds 15]
"""

import argparse
import http.client
import os
import signal
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import (
    PROJECT,
    free_port,
    mnist_mlops,
    one_image_body,
    pid_serving,
    stop,
    wait_until,
)


def ping(port: int, context) -> bool:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    connection.request("GET", "/ping")
    return connection.getresponse().status == 200


def load(port: int, context, body: bytes, clients: int, seconds: float, kill=None):
    """(latencies of the answered requests, failures, latencies after the kill)."""
    latencies: list[tuple[float, float]] = []
    failures = [0]
    stop = threading.Event()

    def client() -> None:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                connection.request(
                    "POST", "/invocations", body, {"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures[0] += 1
                else:
                    latencies.append((started, time.perf_counter() - started))
            except (OSError, http.client.HTTPException):
                failures[0] += 1
                connection.close()
                connection = http.client.HTTPSConnection(
                    "127.0.0.1", port, context=context, timeout=30
                )

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    killed_at = None
    if kill is not None:
        time.sleep(seconds / 3)
        killed_at = time.perf_counter()
        kill()
        time.sleep(seconds * 2 / 3)
    else:
        time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    after = [latency for started, latency in latencies if killed_at and started >= killed_at]
    return [latency for _started, latency in latencies], failures[0], after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    arguments = parser.parse_args()
    body = one_image_body()
    with tempfile.TemporaryDirectory(prefix="mnist-replicas-") as temporary:
        folder = Path(temporary)
        subprocess.run(mnist_mlops("certs", "--directory", str(folder / "certs")), check=True)
        context = ssl.create_default_context(cafile=str(folder / "certs" / "ca.crt"))
        env = {**os.environ, "MNIST_INFERENCE_LOG_DIR": str(folder / "log")}
        results = {}
        for replicas in (1, 2, "failover"):
            count = 2 if replicas == "failover" else replicas
            first, port = free_port(count), free_port()
            proxy = subprocess.Popen(
                mnist_mlops(
                    *("proxy", "model", "--replicas", str(count)),
                    *("--replica-port", str(first), "--model-port", str(port)),
                    *("--rate", "1000000", "--burst", "1000000"),
                    *("--certificate", str(folder / "certs" / "server.crt")),
                    *("--key", str(folder / "certs" / "server.key")),
                ),
                cwd=PROJECT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_until(
                    lambda port=port: ping(port, context),
                    proxy,
                    "the proxy and its replicas",
                    seconds=180,
                )
                kill = None
                if replicas == "failover":

                    def kill(first=first) -> None:
                        os.kill(pid_serving(first), signal.SIGKILL)

                results[replicas] = load(
                    port, context, body, arguments.clients, arguments.seconds, kill
                )
            finally:
                stop(proxy)
    for replicas in (1, 2):
        latencies, failures, _after = results[replicas]
        p99 = statistics.quantiles(latencies, n=100)[98] * 1000
        print(
            f"{replicas} replica(s), {arguments.clients} clients: "
            f"{len(latencies) / arguments.seconds:,.0f} requests/s, p99 {p99:.1f} ms, "
            f"{failures} failed"
        )
    latencies, failures, after = results["failover"]
    after_p99 = statistics.quantiles(after, n=100)[98] * 1000
    print(
        f"failover (2 replicas, one SIGKILLed after {arguments.seconds / 3:.0f} s): "
        f"{len(latencies) + failures:,} requests, {failures} failed, slowest after the kill "
        f"{max(after) * 1000:.0f} ms (p99 after it {after_p99:.1f} ms)"
    )


if __name__ == "__main__":
    main()
