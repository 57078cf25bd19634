"""The batch wing's commands: `score` (a dataset through one registered version),
`batch-input` (the batch format from an .npz or a folder of images) and `spark-cluster`
(a standalone master and worker on 127.0.0.1)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHAMPION_URI = "models:/mnist-classifier@champion"


def add_commands(commands: argparse._SubParsersAction) -> None:
    scoring = commands.add_parser(
        "score", help="score a Parquet dataset of images with one registered model version"
    )
    scoring.add_argument("input", type=Path, metavar="INPUT", help="Parquet: id, image (784 bytes)")
    scoring.add_argument("output", type=Path, metavar="OUTPUT", help="the Parquet folder to write")
    scoring.add_argument("--model-uri", default=CHAMPION_URI, help="resolved once, at the start")
    scoring.add_argument("--engine", choices=("local", "spark"), default="local", help="where")
    scoring.add_argument(
        "--master", default="local[*]", help="the Spark master: local[N] or spark://HOST:PORT"
    )
    scoring.add_argument("--batch-size", type=int, default=8192, help="images per batch read")
    scoring.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    scoring.set_defaults(run=score)

    inputs = commands.add_parser(
        "batch-input", help="write the batch format from an .npz or a folder of PNG/JPEG files"
    )
    inputs.add_argument("source", type=Path, metavar="SOURCE", help="an .npz, or a folder")
    inputs.add_argument("output", type=Path, metavar="OUTPUT", help="the Parquet file to write")
    inputs.add_argument("--array", default="images", help="the .npz array of 28×28 images")
    inputs.set_defaults(run=batch_input)

    cluster = commands.add_parser(
        "spark-cluster", help="run a Spark standalone master and worker on 127.0.0.1"
    )
    cluster.add_argument("--port", type=int, default=7077, help="the master's port")
    cluster.add_argument("--ui-port", type=int, default=8080, help="the master's web UI")
    cluster.add_argument("--worker-ui-port", type=int, default=8081, help="the worker's web UI")
    cluster.add_argument("--cores", type=int, default=2, help="the worker's cores")
    cluster.add_argument("--memory", default="2g", help="the worker's memory")
    cluster.set_defaults(run=spark_cluster)


def spark_cluster(arguments: argparse.Namespace) -> int:
    from mnist_mlops.batch.cluster import ClusterSettings, run_cluster
    from mnist_mlops.batch.formats import BatchError

    settings = ClusterSettings(
        arguments.port,
        arguments.ui_port,
        arguments.worker_ui_port,
        arguments.cores,
        arguments.memory,
    )
    try:
        return run_cluster(settings)
    except BatchError as error:
        print(f"mnist-mlops spark-cluster: {error}", file=sys.stderr)
        return 1


def score(arguments: argparse.Namespace) -> int:
    from mnist_mlops.batch.formats import BatchError
    from mnist_mlops.batch.jobs import Job, run_job
    from mnist_mlops.tracking.store import report_store_failure

    job = Job(
        input=arguments.input,
        output=arguments.output,
        model_uri=arguments.model_uri,
        engine=arguments.engine,
        master=arguments.master,
        batch_size=arguments.batch_size,
        overwrite=arguments.overwrite,
    )
    try:
        outcome = run_job(job)
    except BatchError as error:
        print(f"mnist-mlops score: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        return report_store_failure("score", error, 1)
    print(outcome.line(job))
    return 0


def batch_input(arguments: argparse.Namespace) -> int:
    from mnist_mlops.batch.formats import BatchError
    from mnist_mlops.batch.inputs import write_input

    try:
        count = write_input(arguments.source, arguments.output, arguments.array)
    except BatchError as error:
        print(f"mnist-mlops batch-input: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} images in the batch format to {arguments.output}")
    return 0
