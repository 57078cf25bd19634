"""Benchmark: what MLflow's system-metrics logging costs the training stage's fit, in one run.

Runs the train stage on the project's processed data (real MNIST after
`MNIST_MIRROR=… make repro`) in a scratch folder with its own MLflow store,
alternating sampling intervals (0 = off) so that the machine's drift hits
each alike, and prints the median `fit_seconds` of each.

    python -m benchmarks.system_metrics [--repeat 3] [--intervals 0 1 0.2]
"""

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

import yaml
from mlflow import MlflowClient

from benchmarks.common import PROCESSED, PROJECT, mnist_mlops, needs_processed_data, project_env


def fit_seconds(scratch: Path, interval: float) -> tuple[float, int]:
    """Train once with this interval; return the fit time and how many CPU samples were logged."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["mlflow"]["system_metrics_interval_seconds"] = interval
    (scratch / "params.yaml").write_text(yaml.safe_dump(params))
    store = f"sqlite:///{scratch / 'mlflow.db'}"
    env = project_env(MLFLOW_TRACKING_URI=store)
    subprocess.run(
        mnist_mlops("train"),
        cwd=scratch,
        env=env,
        check=True,
        capture_output=True,
    )
    client = MlflowClient(store)
    (latest,) = client.search_runs(
        [client.get_experiment_by_name("mnist").experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    samples = len(
        client.get_metric_history(latest.info.run_id, "system/cpu_utilization_percentage")
    )
    return latest.data.metrics["fit_seconds"], samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--intervals", type=float, nargs="+", default=[0, 1, 0.2])
    arguments = parser.parse_args()
    needs_processed_data()
    results: dict[float, list[tuple[float, int]]] = {value: [] for value in arguments.intervals}
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "data").mkdir()
        (Path(scratch) / "data" / "processed").symlink_to(PROCESSED)
        for _ in range(arguments.repeat):
            for interval in arguments.intervals:
                results[interval].append(fit_seconds(Path(scratch), interval))
    off = statistics.median(seconds for seconds, _ in results[arguments.intervals[0]])
    for interval, measured in results.items():
        median = statistics.median(seconds for seconds, _ in measured)
        label = "off" if interval == 0 else f"every {interval:g} s"
        print(
            f"system metrics {label:>12}: fit {median:.2f} s median "
            f"({', '.join(f'{seconds:.2f}' for seconds, _ in measured)}), "
            f"{median / off:.3f}x the first; CPU samples per run {[n for _, n in measured]}"
        )


if __name__ == "__main__":
    main()
