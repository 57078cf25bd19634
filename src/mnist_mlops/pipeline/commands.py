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
    status = run_stage(arguments.command, arguments.params)
    # Python's last garbage collection would walk every object that MLflow,
    # TensorFlow and the rest created: 0.5–1 s at the end of every stage. The
    # stage is done (outputs renamed into place, files closed, run ended), so
    # those objects are frozen out of it; exit handlers still run.
    gc.freeze()
    return status


def run_stage(stage: str, params_file: Path) -> int:
    """Run one pipeline stage; errors a user can fix get one line, others their traceback."""
    from mnist_mlops.config import ConfigError, load_params
    from mnist_mlops.model.export import ExportError
    from mnist_mlops.pipeline.fetch import FetchError
    from mnist_mlops.pipeline.preprocess import DataError
    from mnist_mlops.tracking.store import report_store_failure

    try:
        config = load_params(params_file)
        module = importlib.import_module(f"mnist_mlops.pipeline.{stage}")
        if stage == "fetch":
            module.fetch(config.data)
        else:
            getattr(module, stage)(config)
    except ConfigError as error:
        print(f"mnist-mlops {stage}: invalid config: {error}", file=sys.stderr)
        return 2
    except (FetchError, DataError, ExportError, FileNotFoundError) as error:
        print(f"mnist-mlops {stage}: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        return report_store_failure(stage, error, 1)
    except KeyboardInterrupt as interruption:
        print(f"mnist-mlops {stage}: interrupted {interruption}", file=sys.stderr)
        return 130
    return 0
