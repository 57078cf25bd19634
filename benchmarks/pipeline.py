"""Benchmark: what tracking and caching cost over the plain seed script.

On this machine, in one run, it times
  (a) the seed's plain Keras script (benchmarks/seed.py),
  (b) a cold `dvc repro` of this pipeline (fresh clone: no DVC cache, no
      MLflow store) on the real data from a mirror,
  (c) a no-op `dvc repro` right after it,
  (d) the evaluate stage alone, run again in that clone (it scores the ONNX
      model and never loads TensorFlow),
and compares the train stage's `fit` with the seed's `fit`.

    python -m benchmarks.pipeline [--mirror DIR] [--repeat N]

The mirror defaults to $MNIST_MIRROR, else ../shared/data/mnist. Timings are
medians over --repeat runs.
"""

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import PROJECT, project_env, timed


def fresh_clone(destination: Path, env: dict) -> Path:
    clone = destination / "clone"
    subprocess.run(["git", "clone", "-q", str(PROJECT), str(clone)], check=True, env=env)
    # Benchmark the working tree as it is, committed or not.
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        if (PROJECT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, clone / name)
    for generated in ("dvc.lock", "reports", "models"):
        path = clone / generated
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return clone


def stage_fit_seconds(clone: Path) -> tuple[float, float]:
    with sqlite3.connect(clone / "mlflow.db") as connection:
        (fit_seconds,) = connection.execute(
            "SELECT value FROM latest_metrics WHERE key = 'fit_seconds'"
        ).fetchone()
    metrics = json.loads((clone / "reports" / "metrics.json").read_text())
    return fit_seconds, metrics["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_mirror = os.environ.get("MNIST_MIRROR") or str(PROJECT.parent / "shared/data/mnist")
    parser.add_argument("--mirror", default=default_mirror)
    parser.add_argument("--repeat", type=int, default=1)
    arguments = parser.parse_args()
    mirror = str(Path(arguments.mirror).resolve())

    env = project_env(MNIST_MIRROR=mirror)
    for name in [name for name in env if name.startswith("MLFLOW_")]:
        del env[name]
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    samples: dict[str, list[float]] = {
        name: [] for name in ("seed", "seed_fit", "cold", "noop", "evaluate")
    }
    samples.update(stage_fit=[], seed_accuracy=[], pipeline_accuracy=[])
    for _ in range(arguments.repeat):
        seed_seconds, output = timed(
            [sys.executable, str(PROJECT / "benchmarks" / "seed.py"), mirror], PROJECT, env
        )
        seed = json.loads(output.strip().splitlines()[-1])
        with tempfile.TemporaryDirectory() as scratch:
            clone = fresh_clone(Path(scratch), env)
            cold_seconds, _ = timed(["dvc", "repro"], clone, env)
            noop_seconds, noop_output = timed(["dvc", "repro"], clone, env)
            if "Running stage" in noop_output:
                sys.exit(f"the second dvc repro ran a stage:\n{noop_output}")
            fit_seconds, accuracy = stage_fit_seconds(clone)
            evaluate_seconds, _ = timed(
                [sys.executable, "-m", "mnist_mlops", "evaluate"], clone, env
            )
        samples["seed"].append(seed_seconds)
        samples["seed_fit"].append(seed["fit_seconds"])
        samples["seed_accuracy"].append(seed["test_accuracy"])
        samples["cold"].append(cold_seconds)
        samples["noop"].append(noop_seconds)
        samples["evaluate"].append(evaluate_seconds)
        samples["stage_fit"].append(fit_seconds)
        samples["pipeline_accuracy"].append(accuracy)

    median = {name: statistics.median(values) for name, values in samples.items()}
    print(f"runs: {arguments.repeat} (medians), mirror: {mirror}")
    print(
        f"(a) seed script            {median['seed']:7.2f} s  (fit {median['seed_fit']:.2f} s, "
        f"test_accuracy {median['seed_accuracy']:.4f})"
    )
    print(
        f"(b) cold dvc repro         {median['cold']:7.2f} s  (fit {median['stage_fit']:.2f} s, "
        f"test_accuracy {median['pipeline_accuracy']:.4f})"
    )
    print(f"(c) no-op dvc repro        {median['noop']:7.2f} s")
    print(f"(d) evaluate stage         {median['evaluate']:7.2f} s (target <= 3 s)")
    print(f"(b)/(a)                    {median['cold'] / median['seed']:7.2f}   (target <= 1.6)")
    print(f"(c)                        {median['noop']:7.2f} s (target <= 1 s)")
    print(
        f"train fit / seed fit       {median['stage_fit'] / median['seed_fit']:7.2f}   "
        "(target <= 1.0; 54,000 images plus validation vs 60,000)"
    )


if __name__ == "__main__":
    main()
