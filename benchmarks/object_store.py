"""Benchmark: the team's object store (SeaweedFS via `mnist-mlops object-store`).

In a temporary folder, on 127.0.0.1, it measures
  (a) start and restart: from launching the command to the first signed PUT
      that succeeds (the store ready for MLflow and DVC);
  (b) the store's memory (resident set of `weed`) idle, and after 200 MB
      were written into it;
  (c) an artifact round trip through a tracking server (`mlflow server
      --serve-artifacts`, SQLite backend): the same files logged and read
      back by a client, once with a local-disk destination and once with
      s3://mlflow/…, medians over --repeat rounds, and their ratio.

    python benchmarks/object_store.py [--repeat 5]
"""

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mnist_mlops.team.object_store import keys_for, s3_client


def free_port(count: int = 1) -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65536:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def start_store(folder: Path, port: int) -> tuple[subprocess.Popen, float]:
    """The store's command, and seconds from launch to the first PUT that succeeds."""
    secret = (folder / "object-store.secret").read_bytes().strip()
    client = s3_client(f"http://127.0.0.1:{port}", keys_for(secret, "alice"))
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mnist_mlops",
            "object-store",
            "--port",
            str(port),
            "--users",
            "alice",
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            client.put_object(Bucket="dvc", Key="probe", Body=b"probe")
            return process, time.perf_counter() - started
        except Exception:
            if process.poll() is not None or time.perf_counter() - started > 120:
                sys.exit("the object store did not start")
            time.sleep(0.05)


def resident_megabytes(store: subprocess.Popen) -> float:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if int(stat.rsplit(")", 1)[1].split()[1]) == store.pid:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    return float("nan")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)


def round_trip(url: str, files: Path, repeat: int) -> float:
    """Median seconds to log `files` as a run's artifacts and download them again."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    import mlflow

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment("round-trip")
    seconds = []
    with tempfile.TemporaryDirectory() as downloads:
        for attempt in range(repeat):
            started = time.perf_counter()
            with mlflow.start_run() as run:
                mlflow.log_artifacts(str(files), "files")
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="files", dst_path=f"{downloads}/{attempt}"
            )
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def tracking_server(folder: Path, destination: str, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--backend-store-uri", f"sqlite:///{folder / f'{port}.db'}"),
        *("--artifacts-destination", destination, "--serve-artifacts", "--workers", "1"),
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return process, url
        except OSError:
            time.sleep(0.2)
    sys.exit(f"mlflow server for {destination} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mnist-object-store-bench-") as temporary:
        folder = Path(temporary)
        secret_file = folder / "object-store.secret"
        secret_file.write_text(secrets.token_urlsafe(48))
        secret_file.chmod(0o600)
        port = free_port(8)
        store, first_start = start_store(folder, port)
        time.sleep(3)
        idle = resident_megabytes(store)
        secret = secret_file.read_bytes().strip()
        endpoint = f"http://127.0.0.1:{port}"
        alice = s3_client(endpoint, keys_for(secret, "alice"))
        for index in range(4):
            alice.put_object(Bucket="dvc", Key=f"load/{index}", Body=os.urandom(50 * 1024 * 1024))
        loaded = resident_megabytes(store)
        stop(store)
        store, restart = start_store(folder, port)

        files = folder / "artifacts"
        files.mkdir()
        (files / "model.bin").write_bytes(os.urandom(20 * 1024 * 1024))
        for index in range(20):
            (files / f"small-{index}.json").write_text(f'{{"value": {index}}}')
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        local, local_url = tracking_server(folder, str(folder / "local-artifacts"), env)
        s3_env = {
            **env,
            **keys_for(secret, "tracking").environment(),
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }
        on_s3, s3_url = tracking_server(folder, "s3://mlflow/bench", s3_env)
        try:
            local_seconds = round_trip(local_url, files, arguments.repeat)
            s3_seconds = round_trip(s3_url, files, arguments.repeat)
        finally:
            for process in (local, on_s3):
                stop(process)
            stop(store)
    print(f"object store start to first PUT:   {first_start:.2f} s")
    print(f"object store restart to first PUT: {restart:.2f} s")
    print(f"memory (weed, resident): idle {idle:.0f} MB, after 200 MB written {loaded:.0f} MB")
    print(
        f"artifact round trip through the server (20 MB + 20 small files, median of "
        f"{arguments.repeat}): local disk {local_seconds:.2f} s, S3 {s3_seconds:.2f} s, "
        f"ratio {s3_seconds / local_seconds:.2f}×"
    )


if __name__ == "__main__":
    main()
