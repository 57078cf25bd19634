"""The proxy's cost: the champion served directly and behind `mnist-mlops proxy`, side by side.

Run through `python benchmarks/serving.py --proxy`. Starts the champion under
`mnist-mlops serve`, nginx in front of it over HTTPS (with the rate limit
raised out of the way and a throwaway certificate), then sends single-image
requests on keep-alive connections to each in turn, in alternating rounds so
that the machine's drift hits both alike.
"""

import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serving import PROJECT, client, free_port, measure, start

ROUNDS = 40


def start_proxy(upstream_port: int, certificates: Path, env: dict):
    """nginx before 127.0.0.1:`upstream_port`; return the process, its port and an SSL context."""
    mnist_mlops = str(Path(sys.executable).parent / "mnist-mlops")
    subprocess.run([mnist_mlops, "certs", "--directory", str(certificates)], check=True, env=env)
    context = ssl.create_default_context(cafile=certificates / "ca.crt")
    port = free_port()
    process = subprocess.Popen(
        [
            *(mnist_mlops, "proxy", "model", "--model-upstream", f"127.0.0.1:{upstream_port}"),
            *("--model-port", str(port), "--rate", "1000000", "--burst", "1000000"),
            *("--certificate", str(certificates / "server.crt")),
            *("--key", str(certificates / "server.key")),
        ],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/ping", context=context):
                return process, port, context
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit("the proxy did not start")
            time.sleep(0.1)


def compare(command: list[str], env: dict, body: bytes, requests: int, clients: int) -> None:
    server, server_port, _ = start(command, env, body)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            proxy, proxy_port, context = start_proxy(server_port, Path(scratch) / "certs", env)
            try:
                targets = {"direct": (server_port, None), "proxy": (proxy_port, context)}
                paired: dict[str, list[float]] = {name: [] for name in targets}
                for port, tls in targets.values():
                    client(port, body, 50, [], tls)
                for index in range(ROUNDS):
                    order = list(targets.items())
                    for name, (port, tls) in order if index % 2 == 0 else reversed(order):
                        client(port, body, requests // ROUNDS, paired[name], tls)
                rows = {
                    name: {
                        "p50": statistics.median(paired[name]) * 1000,
                        "sequential": len(paired[name]) / sum(paired[name]),
                        "concurrent": measure(port, body, requests, clients, tls)["rps"],
                    }
                    for name, (port, tls) in targets.items()
                }
            finally:
                proxy.terminate()
                proxy.wait(timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{requests} single-image requests each, side by side in {ROUNDS} rounds")
    print(f"{'':8} {'p50 ms':>7} {'req/s':>7} {f'{clients} clients req/s':>18}")
    for name, row in rows.items():
        print(f"{name:8} {row['p50']:7.3f} {row['sequential']:7.1f} {row['concurrent']:18.1f}")
    cost = rows["proxy"]["p50"] - rows["direct"]["p50"]
    print(f"the proxy's cost at p50: {cost:.3f} ms (target <= 0.3 ms)")
