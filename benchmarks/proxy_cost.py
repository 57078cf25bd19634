"""The proxy's cost: the champion served directly and behind `mnist-mlops proxy`, side by side.

Run through `python -m benchmarks.serving --proxy`. Starts the champion under
`mnist-mlops serve`, nginx in front of it over HTTPS (with the rate limit
raised out of the way and a throwaway certificate), then sends single-image
requests on keep-alive connections to each in turn, in alternating rounds so
that the machine's drift hits both alike.
"""

import ssl
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import (
    PROJECT,
    alternating,
    answers,
    client,
    free_port,
    measure,
    mnist_mlops,
    start_server,
    stop,
    wait_until,
)

ROUNDS = 40


def start_proxy(upstream_port: int, certificates: Path, env: dict):
    """nginx before 127.0.0.1:`upstream_port`; return the process, its port and an SSL context."""
    subprocess.run(mnist_mlops("certs", "--directory", str(certificates)), check=True, env=env)
    context = ssl.create_default_context(cafile=certificates / "ca.crt")
    port = free_port()
    process = subprocess.Popen(
        mnist_mlops(
            *("proxy", "model", "--model-upstream", f"127.0.0.1:{upstream_port}"),
            *("--model-port", str(port), "--rate", "1000000", "--burst", "1000000"),
            *("--certificate", str(certificates / "server.crt")),
            *("--key", str(certificates / "server.key")),
        ),
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: answers(f"https://127.0.0.1:{port}/ping", context), process, "the proxy")
    return process, port, context


def compare(command: list[str], env: dict, body: bytes, requests: int, clients: int) -> None:
    server, server_port, _ = start_server(command, env, body)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            proxy, proxy_port, context = start_proxy(server_port, Path(scratch) / "certs", env)
            try:
                targets = {"direct": (server_port, None), "proxy": (proxy_port, context)}
                for port, tls in targets.values():
                    client(port, body, 50, [], tls)

                def round_of(name: str) -> list[float]:
                    latencies: list[float] = []
                    port, tls = targets[name]
                    client(port, body, requests // ROUNDS, latencies, tls)
                    return latencies

                paired = alternating(ROUNDS, list(targets), round_of)
                rows = {
                    name: {
                        "p50": statistics.median(paired[name]) * 1000,
                        "sequential": len(paired[name]) / sum(paired[name]),
                        "concurrent": measure(port, body, requests, clients, tls)["rps"],
                    }
                    for name, (port, tls) in targets.items()
                }
            finally:
                stop(proxy)
    finally:
        stop(server)
    print(f"{requests} single-image requests each, side by side in {ROUNDS} rounds")
    print(f"{'':8} {'p50 ms':>7} {'req/s':>7} {f'{clients} clients req/s':>18}")
    for name, row in rows.items():
        print(f"{name:8} {row['p50']:7.3f} {row['sequential']:7.1f} {row['concurrent']:18.1f}")
    cost = rows["proxy"]["p50"] - rows["direct"]["p50"]
    print(f"the proxy's cost at p50: {cost:.3f} ms (target <= 0.3 ms)")
