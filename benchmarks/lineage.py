"""Benchmark: `mnist-mlops lineage REQUEST_ID` on an inference log of 100,000 requests.

Writes a log as a busy server does (one image a request, pixels kept, a file
per 2,500 requests: a second of one busy worker) into a temporary project with a registered
version, then times the command, from a shell, for the oldest request, the
newest, and one that is not there (every file read); then the search alone,
in this process, and `lineage v1`, which reads no log.

    python -m benchmarks.lineage [--requests 100000] [--repeat 3]

The project's own store and log are never touched.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import mnist_mlops, project_env

MODEL = "mnist-classifier"


def write_log(log_dir: Path, requests: int) -> None:
    from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings

    settings = LogSettings(log_dir, flush_seconds=3600)
    log = InferenceLog(settings, MODEL, "1")
    pixels = np.random.default_rng(0).integers(0, 256, (1, 28, 28)).astype(np.float32)
    answer = [{"digit": 3, "probabilities": np.eye(10)[3].tolist()}]
    per_file = 2500  # a second of a busy worker
    for first in range(0, requests, per_file):
        batch = []
        for number in range(first, min(first + per_file, requests)):
            batch.append(("rows", f"req-{number}", float(number), pixels, answer, "1", ""))
        log._write(batch)
    log.close()


def registered(folder: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    client.create_registered_model(MODEL)
    run = client.create_run(client.create_experiment("mnist"))
    client.log_text(run.info.run_id, "a stand-in model", "model/MLmodel")
    client.create_model_version(
        MODEL, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags={"gate": "passed"}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mnist-lineage-") as scratch:
        folder = Path(scratch)
        log_dir = folder / "logs" / "inference"
        write_log(log_dir, arguments.requests)
        registered(folder)
        size = sum(path.stat().st_size for path in log_dir.iterdir()) / 2**20
        files = len(list(log_dir.iterdir()))
        print(f"{arguments.requests:,} requests in {files} files, {size:.0f} MiB")
        env = {key: value for key, value in project_env().items() if key != "MLFLOW_TRACKING_URI"}
        run(["lineage", "req-0"], folder, env)  # the files into the page cache, as after a write
        for what, request in [
            ("the oldest request", "req-0"),
            ("the newest request", f"req-{arguments.requests - 1}"),
            ("an unknown id", "req-never"),
        ]:
            seconds = [run(["lineage", request], folder, env) for _ in range(arguments.repeat)]
            print(f"lineage, {what}: {statistics.median(seconds):.2f} s (median of {len(seconds)})")
        from mnist_mlops.monitoring.lineage import find_request

        searches = []
        for _ in range(arguments.repeat):
            started = time.perf_counter()
            find_request(log_dir, "req-never")
            searches.append(time.perf_counter() - started)
        print(f"the search alone, every file read: {1000 * statistics.median(searches):.0f} ms")
        alone = statistics.median(
            run(["lineage", "v1"], folder, env) for _ in range(arguments.repeat)
        )
        print(f"lineage v1, no log read: {alone:.2f} s (the command and the store alone)")


def run(arguments: list[str], folder: Path, env: dict) -> float:
    """Seconds for one command; an answer other than found (0) or not found (1) ends it."""
    started = time.perf_counter()
    done = subprocess.run(mnist_mlops(*arguments), cwd=folder, env=env, capture_output=True)
    if done.returncode not in (0, 1):
        sys.exit(f"mnist-mlops {' '.join(arguments)} failed:\n{done.stderr.decode()[-2000:]}")
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
