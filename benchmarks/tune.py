"""Benchmark: `mnist-mlops tune` on the real data, in one run on this machine.

  (a) throughput: the same study (pruning off) with 1 worker, then with 2
      worker processes: finished trials per minute, wall clock from the first
      start to the last exit (TensorFlow's start-up included);
  (b) pruning: a study with the median pruner against the same study (same
      seed) with pruning off, at an equal budget of finished trials: the
      epochs both spent, and their best val_accuracy.

    python -m benchmarks.tune [--trials 20] [--throughput-trials 8]

It needs data/processed as the pipeline made it (`make repro`); each study
runs in a temporary copy of conf/ and data/processed with its own stores.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from benchmarks.common import PROCESSED, PROJECT, mnist_mlops, needs_processed_data, project_env
from mnist_mlops.tuning.studies import STORAGE_ENV


def study(workdir: Path, name: str, workers: int, *arguments: str) -> tuple[float, optuna.Study]:
    """Run `workers` tune processes on one study; return the wall time and the study."""
    env = project_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop(STORAGE_ENV, None)
    command = mnist_mlops("tune", "--study", name, *arguments)
    started = time.perf_counter()
    processes = [
        subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(workers)
    ]
    for process in processes:
        output, _ = process.communicate()
        if process.returncode != 0:
            sys.exit(f"tune failed:\n{output}")
    elapsed = time.perf_counter() - started
    loaded = optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'optuna.db'}")
    return elapsed, loaded


def finished(loaded: optuna.Study) -> list:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [trial for trial in loaded.trials if trial.state in states]


def epochs(loaded: optuna.Study) -> int:
    return sum(trial.user_attrs["epochs_run"] for trial in finished(loaded))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trials", type=int, default=20, help="budget of the pruning studies (0: skip them)"
    )
    parser.add_argument("--throughput-trials", type=int, default=8)
    parser.add_argument(
        "--workers", type=int, default=1, help="workers of the pruning studies (1: repeatable)"
    )
    arguments = parser.parse_args()
    needs_processed_data()

    with tempfile.TemporaryDirectory(prefix="tune-benchmark-") as temporary:
        workdir = Path(temporary)
        shutil.copytree(PROJECT / "conf", workdir / "conf")
        shutil.copytree(PROCESSED, workdir / "data" / "processed")

        # (a) Short trials (3 to 5 epochs), pruning off: only the workers differ.
        short = ["--pruner", "none", "search.train.epochs.low=3", "search.train.epochs.high=5"]
        budget = ["--trials", str(arguments.throughput_trials)]
        rates = {}
        for workers in (1, 2):
            elapsed, loaded = study(workdir, f"throughput-{workers}", workers, *budget, *short)
            rates[workers] = len(finished(loaded)) / (elapsed / 60)
            print(
                f"{workers} worker(s): {len(finished(loaded))} trials, {epochs(loaded)} epochs "
                f"in {elapsed:.0f} s: {rates[workers]:.2f} trials/min",
                flush=True,
            )

        # (b) The mlp search space as shipped, same seed, pruning on and off.
        budget = ["--trials", str(arguments.trials)]
        results = {}
        for pruner in ("median", "none") if arguments.trials else ():
            elapsed, loaded = study(
                workdir, f"pruning-{pruner}", arguments.workers, *budget, "--pruner", pruner
            )
            pruned = sum(trial.state.name == "PRUNED" for trial in loaded.trials)
            results[pruner] = (epochs(loaded), loaded.best_value, elapsed)
            print(
                f"pruner {pruner}: {len(finished(loaded))} trials ({pruned} pruned), "
                f"{epochs(loaded)} epochs in {elapsed:.0f} s, best val_accuracy "
                f"{loaded.best_value:.4f} (trial {loaded.best_trial.number})",
                flush=True,
            )

    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| trials/min, 1 worker | {rates[1]:.2f} |")
    print(f"| trials/min, 2 workers | {rates[2]:.2f} ({rates[2] / rates[1]:.2f}×) |")
    if not results:
        return
    (pruned_epochs, pruned_best, pruned_time), (full_epochs, full_best, full_time) = (
        results["median"],
        results["none"],
    )
    print(
        f"| epochs, median pruner / none | {pruned_epochs} / {full_epochs} "
        f"({1 - pruned_epochs / full_epochs:.0%} fewer) |"
    )
    print(f"| wall time, median pruner / none | {pruned_time:.0f} s / {full_time:.0f} s |")
    print(
        f"| best val_accuracy, median / none | {pruned_best:.4f} / {full_best:.4f} "
        f"(difference {full_best - pruned_best:+.4f}) |"
    )


if __name__ == "__main__":
    main()
