"""Benchmark: the request path with the inference log on the object store, against a folder.

Two `mnist-mlops serve` of the project's champion side by side on 127.0.0.1,
one logging into a local folder, the other into s3://inference/… on a
SeaweedFS store (`mnist-mlops object-store`, started here) through its local
spool. Alternating rounds of sequential one-image requests (p50) and of 8
clients (requests/s), then the ratios; the rows each log holds at the end.
Target: p50 with the log on the store at most 1.05× the folder's.

    python -m benchmarks.log_on_store [--rounds 3] [--requests 2000]
"""

import argparse
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    CHAMPION,
    PROJECT,
    alternating,
    free_port,
    measure,
    mnist_mlops,
    needs_processed_data,
    one_image_body,
    project_env,
    ratio_line,
    start_server,
    stop,
    wait_until,
)
from mnist_mlops.team.object_store import keys_for


def start_store(folder: Path) -> tuple[subprocess.Popen, dict]:
    """The store on free ports, and the environment that reaches it with the `serving` keys."""
    secret = folder / "object-store.secret"
    secret.write_text(secrets.token_urlsafe(48))
    secret.chmod(0o600)
    port = free_port(8)
    output = folder / "store.out"
    process = subprocess.Popen(
        mnist_mlops("object-store", "--port", str(port)),
        cwd=folder,
        stdout=output.open("w"),
        stderr=subprocess.STDOUT,
    )
    wait_until(lambda: "object store ready" in output.read_text(), process, "object-store")
    endpoint = f"http://127.0.0.1:{port}"
    keys = keys_for(secret.read_bytes().strip(), "serving").environment()
    return process, {"AWS_ENDPOINT_URL": endpoint, **keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    arguments = parser.parse_args()
    needs_processed_data()
    body = one_image_body()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        store, keys = start_store(folder)
        servers = {}
        try:
            env = project_env(MLFLOW_TRACKING_URI=f"sqlite:///{PROJECT / 'mlflow.db'}", **keys)
            logs = {"folder": str(folder / "log"), "store": "s3://inference/benchmark"}
            for name, log_dir in logs.items():
                command = mnist_mlops("serve", "--model-uri", CHAMPION, "--log-dir", log_dir)
                command += ["--log-spool", str(folder / "spool")]
                servers[name] = start_server(command, env, body)[:2]

            def sequential(name: str) -> float:
                return measure(servers[name][1], body, arguments.requests, 1)["p50_ms"]

            def busy(name: str) -> float:
                return measure(servers[name][1], body, arguments.requests * 2, 8)["rps"]

            names = list(servers)
            p50 = alternating(arguments.rounds, names, sequential)
            rps = alternating(arguments.rounds, names, busy)
            print(ratio_line(p50, "store", "folder", "≤ 1.05") + " (p50 ms, 1 client)")
            print(ratio_line(rps, "store", "folder") + " (requests/s, 8 clients)")
            for name in names:
                print(
                    f"{name}: p50 per round {', '.join(f'{value:.3f}' for value in p50[name])} ms;"
                    f" req/s median {statistics.median(rps[name]):.0f}"
                )
        finally:
            for process, _port in servers.values():
                stop(process)
            time.sleep(0.5)
            stop(store)
        spooled = list((folder / "spool").glob("*.npz"))
        print(f"files left in the spool after SIGTERM: {len(spooled)}")


if __name__ == "__main__":
    main()
