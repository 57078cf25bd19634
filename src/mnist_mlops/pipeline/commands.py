"""The pipeline's commands: one per DVC stage, each the `cmd` of its stage in dvc.yaml, and
`retrain` (the feedback snapshot, then `dvc repro`).

A stage's config is read from params.yaml and validated before any stage code
(and TensorFlow) loads.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from pathlib import Path

from mnist_mlops.paths import PARAMS_FILE, inference_log_dir

STAGES = {
    "fetch": "download MNIST into data/raw and verify it",
    "preprocess": "validate data/raw and split it into data/processed",
    "train": "train the model and log the run to MLflow",
    "evaluate": "score the model, log it to the same run, register it behind the gate",
}


def add_commands(commands: argparse._SubParsersAction) -> None:
    for stage, help_text in STAGES.items():
        command = commands.add_parser(stage, help=help_text, description=help_text)
        command.add_argument("--params", type=Path, default=PARAMS_FILE, help="the composed config")
        command.set_defaults(run=run)
        if stage == "train":
            command.add_argument(
                "--local-processes",
                type=int,
                metavar="N",
                help="train data-parallel with N processes on this machine (JAX; docs: "
                "Training across machines) instead of train.distributed.processes",
            )
    add_worker_command(commands)
    again = commands.add_parser(
        "retrain",
        help="snapshot the feedback, `dvc repro`, and say what the promotion gate decided",
    )
    again.add_argument(
        "--log-dir",
        type=Path,
        default=inference_log_dir(),
        help="the inference log's folder (%(default)s; MNIST_INFERENCE_LOG_DIR sets the default)",
    )
    again.set_defaults(run=retrain)


def add_worker_command(commands: argparse._SubParsersAction) -> None:
    about = (
        "run one of the other processes of a data-parallel `train` (train.distributed): "
        "same commit, same data/processed; logs nothing, writes nothing"
    )
    worker = commands.add_parser("train-worker", help=about, description=about)
    worker.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="where process 0 (the train stage) listens (train.distributed.coordinator)",
    )
    worker.add_argument(
        "--process-id", type=int, required=True, metavar="I", help="this process: 1 … N−1"
    )
    worker.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="how many processes train together (train.distributed.processes)",
    )
    worker.add_argument("--params", type=Path, default=PARAMS_FILE, help="the composed config")
    worker.set_defaults(run=train_worker)


def train_worker(arguments: argparse.Namespace) -> int:
    from mnist_mlops.config import ConfigError, load_params
    from mnist_mlops.pipeline.distributed import DistributedError, run_worker, with_processes

    try:
        config = with_processes(
            load_params(arguments.params),
            arguments.processes,
            arguments.coordinator,
            arguments.process_id,
        )
        run_worker(config, arguments.process_id)
    except ConfigError as error:
        print(f"mnist-mlops train-worker: invalid config: {error}", file=sys.stderr)
        return 2
    except DistributedError as error:
        print(f"mnist-mlops train-worker: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mnist-mlops train-worker: interrupted", file=sys.stderr)
        return 130
    return 0


def retrain(arguments: argparse.Namespace) -> int:
    from mnist_mlops.monitoring.snapshot import SnapshotError
    from mnist_mlops.pipeline.retrain import RetrainError
    from mnist_mlops.pipeline.retrain import retrain as run_retrain

    try:
        retraining = run_retrain(arguments.log_dir)
    except (SnapshotError, RetrainError) as error:
        print(f"mnist-mlops retrain: {error}", file=sys.stderr)
        return 1
    print(retraining.report())
    return 0


def run(arguments: argparse.Namespace) -> int:
    status = run_stage(
        arguments.command, arguments.params, getattr(arguments, "local_processes", None)
    )
    # Python's last garbage collection would walk every object that MLflow,
    # TensorFlow and the rest created: 0.5–1 s at the end of every stage. The
    # stage is done (outputs renamed into place, files closed, run ended), so
    # those objects are frozen out of it; exit handlers still run.
    gc.freeze()
    return status


def run_stage(stage: str, params_file: Path, local_processes: int | None = None) -> int:
    """Run one pipeline stage; errors a user can fix get one line, others their traceback."""
    from mnist_mlops.config import ConfigError, load_params
    from mnist_mlops.model.export import ExportError
    from mnist_mlops.pipeline.distributed import DistributedError, with_local_processes
    from mnist_mlops.pipeline.fetch import FetchError
    from mnist_mlops.pipeline.preprocess import DataError
    from mnist_mlops.tracking.store import report_store_failure

    try:
        config = load_params(params_file)
        module = importlib.import_module(f"mnist_mlops.pipeline.{stage}")
        if stage == "fetch":
            module.fetch(config.data)
        elif local_processes is not None:
            if local_processes < 1:
                raise ConfigError(f"--local-processes must be 1 or more, got {local_processes}")
            module.train(with_local_processes(config, local_processes), local_workers=True)
        else:
            getattr(module, stage)(config)
    except ConfigError as error:
        print(f"mnist-mlops {stage}: invalid config: {error}", file=sys.stderr)
        return 2
    except DistributedError as error:
        print(f"mnist-mlops {stage}: data-parallel fit failed: {error}", file=sys.stderr)
        return 1
    except (FetchError, DataError, ExportError, FileNotFoundError) as error:
        print(f"mnist-mlops {stage}: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        return report_store_failure(stage, error, 1)
    except KeyboardInterrupt as interruption:
        print(f"mnist-mlops {stage}: interrupted {interruption}", file=sys.stderr)
        return 130
    return 0
