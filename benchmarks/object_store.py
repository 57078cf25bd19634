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

    python -m benchmarks.object_store [--repeat 5]
"""

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import free_port, mlflow_server, mnist_mlops, project_env, resident_mib, stop
from mnist_mlops.team.object_store import keys_for, s3_client


def start_store(folder: Path, port: int) -> tuple[subprocess.Popen, float]:
    """The store's command, and seconds from launch to the first PUT that succeeds."""
    secret = (folder / "object-store.secret").read_bytes().strip()
    client = s3_client(f"http://127.0.0.1:{port}", keys_for(secret, "alice"))
    started = time.perf_counter()
    process = subprocess.Popen(
        mnist_mlops("object-store", "--port", str(port), "--users", "alice"),
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
    """Resident memory of the store's server (weed), the command's child."""
    return sum(resident_mib(child.pid, False) for child in psutil.Process(store.pid).children())


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
        env = project_env()
        s3_env = project_env(
            **keys_for(secret, "tracking").environment(), MLFLOW_S3_ENDPOINT_URL=endpoint
        )
        try:
            with (
                mlflow_server(folder / "local", env, str(folder / "local-artifacts")) as local,
                mlflow_server(folder / "s3", s3_env, "s3://mlflow/bench") as on_s3,
            ):
                local_seconds = round_trip(local, files, arguments.repeat)
                s3_seconds = round_trip(on_s3, files, arguments.repeat)
        finally:
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
