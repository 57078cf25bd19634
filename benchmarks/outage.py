"""Benchmark: the fit's logging that rides out a tracking outage, against the one before it.

On the real MNIST (the project's data/processed, from `make repro`) and a
real `mlflow server` on 127.0.0.1, it runs the train stage alternately with
this checkout's code (per-epoch metrics and system metrics queued in a RunLog,
sent by a thread) and with the code of BASELINE, the commit before (each
epoch's metrics sent synchronously, MLflow's own system metrics monitor), and
prints the median `fit_seconds` of each with the spread. Then it trains once
more while the server is stopped for `--outage` seconds mid-fit and started
again on the same port, and prints the extra wall time against an
uninterrupted run of the same length.

    python -m benchmarks.outage [--repeat 3] [--outage 30] [--long-epochs 30]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

from benchmarks.common import (
    PROJECT,
    alternating,
    free_port,
    mlflow_server,
    mnist_mlops,
    needs_processed_data,
    project_env,
    ratio_line,
    spread,
)

# The last commit whose train stage logged synchronously.
BASELINE = "f7ac509"


def scratch_project(folder: Path, epochs: int, code: Path | None) -> Path:
    """A folder with the processed data and params.yaml; `code` holds another commit's src/."""
    folder.mkdir()
    (folder / "data").mkdir()
    (folder / "data" / "processed").symlink_to(PROJECT / "data" / "processed")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"]["epochs"] = epochs
    if code is not None:  # the baseline's schema has no outage bound
        params["mlflow"].pop("outage_seconds")
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def train(folder: Path, url: str, code: Path | None) -> subprocess.Popen:
    env = project_env(MLFLOW_TRACKING_URI=url)
    if code is not None:
        env["PYTHONPATH"] = str(code / "src")
    return subprocess.Popen(
        mnist_mlops("train"),
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(training: subprocess.Popen, started: float) -> float:
    _out, errors = training.communicate()
    if training.returncode:
        sys.exit(f"train failed:\n{errors[-3000:]}")
    return time.perf_counter() - started


def latest(url: str) -> tuple[str, dict[str, float]]:
    client = MlflowClient(url)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("mnist").experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return run.info.run_id, run.data.metrics


def compare(scratch: Path, url: str, baseline: Path, repeat: int) -> None:
    folders = {
        "this checkout": (scratch_project(scratch / "new", 5, None), None),
        "baseline": (scratch_project(scratch / "old", 5, baseline), baseline),
    }

    def fit(name: str) -> float:
        folder, code = folders[name]
        finished(train(folder, url, code), time.perf_counter())
        return latest(url)[1]["fit_seconds"]

    fits = alternating(repeat, list(folders), fit)
    for name, values in fits.items():
        print(f"fit, 5 epochs, {name:>14}: {spread(values)} ({values})")
    print(ratio_line(fits, "this checkout", "baseline", f"1.0; baseline {BASELINE}"))


def outage(scratch: Path, store: Path, port: int, seconds: float, epochs: int) -> None:
    folder = scratch_project(scratch / "long", epochs, None)
    with mlflow_server(store, port=port) as url:
        started = time.perf_counter()
        uninterrupted = finished(train(folder, url, None), started)
        first_run = latest(url)[0]
        training = train(folder, url, None)
        started = time.perf_counter()
        client = MlflowClient(url)
        run_id = first_run
        while run_id == first_run or len(client.get_metric_history(run_id, "loss")) < 3:
            run_id = latest(url)[0]
            time.sleep(0.5)
    time.sleep(seconds)
    with mlflow_server(store, port=port) as url:
        interrupted = finished(training, started)
        steps = [entry.step for entry in MlflowClient(url).get_metric_history(run_id, "loss")]
        status = MlflowClient(url).get_run(run_id).info.status
    whole = "every epoch once" if steps == list(range(epochs)) else f"epochs logged: {steps}"
    print(
        f"{epochs} epochs: uninterrupted {uninterrupted:.1f} s of wall time; with the server "
        f"away {seconds:g} s mid-fit {interrupted:.1f} s (+{interrupted - uninterrupted:.1f} s, "
        f"the server's restart included); run {status}, {whole}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--outage", type=float, default=30)
    parser.add_argument("--long-epochs", type=int, default=30)
    arguments = parser.parse_args()
    needs_processed_data()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        baseline = scratch / "baseline"
        baseline.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(PROJECT), "archive", BASELINE, "src"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        store = scratch / "store"
        store.mkdir()
        if arguments.repeat:
            with mlflow_server(store) as url:
                compare(scratch, url, baseline, arguments.repeat)
        # A port of its own: the first server's workers may still be leaving.
        outage(scratch, store, free_port(), arguments.outage, arguments.long_epochs)


if __name__ == "__main__":
    main()
