"""Benchmark: batch scoring of 200,000 real-format images with the champion, three ways.

Writes 200,000 MNIST images (the processed train and test splits, repeated)
in the batch format to a temporary folder, then runs `mnist-mlops score` on
them with the local engine, with Spark `local[2]`, and on a standalone master
and worker that `mnist-mlops spark-cluster` starts on 127.0.0.1. Each prints
its throughput (from the first batch read to the last row written) apart
from its start-up (the model loaded; for Spark, the session started and the
model shipped). Checks that the three outputs hold the same digits and
probabilities. Needs `make repro` (the champion, data/processed) and
`make install-spark`.

    python -m benchmarks.scoring [--images 200000] [--repeat 3]

Each engine runs `--repeat` times; the run of median throughput is shown.
"""

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from benchmarks.common import PROCESSED, PROJECT, free_port, mnist_mlops, stop, timed, wait_until

LINE = re.compile(r"scored (\d+) images, rejected (\d+), ([\d,]+) images/s \((.+?); ([\d.]+) s")


def batch_input(path: Path, count: int) -> None:
    with np.load(PROCESSED / "train.npz") as train, np.load(PROCESSED / "test.npz") as test:
        images = np.concatenate([train["images"], test["images"]])
    chosen = images[np.arange(count) % len(images)].reshape(count, -1)
    table = pa.table(
        {
            "id": pa.array(np.arange(count, dtype=np.int64)),
            "image": pa.array([row.tobytes() for row in chosen], pa.binary()),
        }
    )
    pq.write_table(table, path)


def score(source: Path, output: Path, *options: str) -> dict:
    wall, output = timed(mnist_mlops("score", str(source), str(output), *options), PROJECT)
    match = LINE.search(output)
    return {
        "engine": match[4],
        "images": int(match[1]),
        "rate": float(match[3].replace(",", "")),
        "startup": float(match[5]),
        "wall": wall,
    }


def outputs_agree(first: Path, second: Path) -> float:
    """The largest difference in probability between two outputs (digits must be equal)."""
    tables = [
        ds.dataset(path, format="parquet").to_table().sort_by("id") for path in (first, second)
    ]
    if tables[0].column("digit") != tables[1].column("digit"):
        raise SystemExit(f"{first} and {second} disagree on digits")
    columns = [f"probability_{digit}" for digit in range(10)]
    return max(
        float(np.abs(tables[0].column(name).to_numpy() - tables[1].column(name).to_numpy()).max())
        for name in columns
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per engine; the median")
    arguments = parser.parse_args()

    def median(source: Path, output: Path, *options: str) -> dict:
        runs = []
        for _ in range(arguments.repeat):
            shutil.rmtree(output, ignore_errors=True)
            runs.append(score(source, output, *options))
        return sorted(runs, key=lambda run: run["rate"])[len(runs) // 2]

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        source = folder / "images.parquet"
        batch_input(source, arguments.images)
        results = [median(source, folder / "local")]
        results.append(
            median(source, folder / "spark", "--engine", "spark", "--master", "local[2]")
        )
        port, ui, worker_ui = free_port(), free_port(), free_port()
        log = folder / "cluster.log"
        with open(log, "w") as output:
            cluster = subprocess.Popen(
                mnist_mlops(
                    *("spark-cluster", "--port", str(port)),
                    *("--ui-port", str(ui), "--worker-ui-port", str(worker_ui)),
                ),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(lambda: "with one worker" in log.read_text(), cluster, "spark-cluster")
            master = f"spark://127.0.0.1:{port}"
            results.append(
                median(source, folder / "standalone", "--engine", "spark", "--master", master)
            )
        finally:
            stop(cluster)
        differences = [
            outputs_agree(folder / "local", folder / name) for name in ("spark", "standalone")
        ]
    local = results[0]["rate"]
    for result in results:
        print(
            f"{result['engine']:<32} {result['rate']:>9,.0f} images/s "
            f"({result['rate'] / local:.2f}× local), start-up {result['startup']:.1f} s, "
            f"the whole command {result['wall']:.1f} s"
        )
    print(f"identical digits; largest probability difference from local: {max(differences):.1e}")


if __name__ == "__main__":
    main()
