"""Benchmark: data-parallel training (train.distributed) against the single TensorFlow process.

On the real MNIST (the project's data/processed, from `make repro`), in a
temporary folder with its own MLflow store, it runs the `train` and
`evaluate` stages twice: as configured (one TensorFlow process) and with
`--local-processes 2` (Keras's JAX backend, gloo collectives on 127.0.0.1).
It also runs one JAX process alone (`python -m mnist_mlops.pipeline.worker
--processes 1`), so that the cost of synchronising a step can be told apart
from the change of backend:

    synchronisation per step ≈ (epoch time with 2 processes − with 1 JAX process) / steps

On one machine both processes share its cores: the number shows what the
collectives cost, not what a second machine would gain.

    python -m benchmarks.distributed [--epochs 5]
"""

import argparse
import json
import math
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import PROCESSED, PROJECT, free_port, needs_processed_data, timed

EPOCH_LINE = re.compile(r"epoch (\d+)/\d+: .*\((\d+\.\d+) s\)")


def command(folder: Path, *arguments: str) -> tuple[str, float]:
    seconds, output = timed([sys.executable, *arguments], folder)
    return output, seconds


def last_run(folder: Path) -> dict[str, float]:
    with sqlite3.connect(folder / "mlflow.db") as database:
        (run_id,) = database.execute(
            "SELECT run_uuid FROM runs ORDER BY start_time DESC LIMIT 1"
        ).fetchone()
        rows = database.execute(
            "SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)
        ).fetchall()
    return dict(rows)


def epochs_of(output: str) -> list[float]:
    return [float(seconds) for _epoch, seconds in EPOCH_LINE.findall(output)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    arguments = parser.parse_args()
    needs_processed_data()
    processed = PROCESSED
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"]["epochs"] = arguments.epochs
    params["train"]["distributed"]["coordinator"] = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="mnist-distributed-") as temporary:
        folder = Path(temporary)
        shutil.copytree(processed, folder / "data" / "processed")
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        results = {}
        for name, extra in (("tensorflow, 1 process", []), ("jax, 2 processes", ["2"])):
            train = ["-m", "mnist_mlops", "train"]
            if extra:
                train += ["--local-processes", *extra]
            output, seconds = command(folder, *train)
            command(folder, "-m", "mnist_mlops", "evaluate")
            metrics = last_run(folder)
            results[name] = {
                "stage_seconds": seconds,
                "fit_seconds": metrics["fit_seconds"],
                "epoch_seconds": epochs_of(output),
                "test_accuracy": metrics["test_accuracy"],
            }
        alone, _seconds = command(
            folder,
            "-m",
            "mnist_mlops.pipeline.worker",
            "--params",
            "params.yaml",
            "--process-id",
            "0",
            "--processes",
            "1",
            "--coordinator",
            params["train"]["distributed"]["coordinator"],
        )
        train_examples = json.loads((processed / "manifest.json").read_text())["examples"]["train"]
    steps = math.ceil(train_examples / params["train"]["batch_size"])
    one_jax = statistics.median(epochs_of(alone)[1:])
    two = results["jax, 2 processes"]
    two_epoch = statistics.median(two["epoch_seconds"][1:])
    tensorflow = results["tensorflow, 1 process"]
    tensorflow_epoch = tensorflow["fit_seconds"] / arguments.epochs
    print(f"{arguments.epochs} epochs, {steps} steps of {params['train']['batch_size']} each")
    print(
        f"  tensorflow, 1 process:  fit {tensorflow['fit_seconds']:6.1f} s, "
        f"{tensorflow_epoch:5.2f} s/epoch (mean), test accuracy {tensorflow['test_accuracy']:.4f}, "
        f"stage {tensorflow['stage_seconds']:.1f} s"
    )
    print(f"  jax, 1 process:         {one_jax:5.2f} s/epoch (median after the first)")
    print(
        f"  jax, 2 processes:       fit {two['fit_seconds']:6.1f} s, {two_epoch:5.2f} s/epoch "
        f"(median after the first; first {two['epoch_seconds'][0]:.2f} s), test accuracy "
        f"{two['test_accuracy']:.4f}, stage {two['stage_seconds']:.1f} s"
    )
    print(
        f"  2 processes / 1 TensorFlow process, per epoch: {two_epoch / tensorflow_epoch:.2f}×; "
        f"synchronisation ≈ {(two_epoch - one_jax) / steps * 1000:.1f} ms per step"
    )


if __name__ == "__main__":
    main()
