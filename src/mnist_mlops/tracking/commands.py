"""The tracking wing's commands: `ui` (the MLflow UI with direct links) and `runs`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_mlops.paths import PARAMS_FILE


def add_commands(commands: argparse._SubParsersAction) -> None:
    browse = commands.add_parser(
        "ui", help="the MLflow UI on the project's store, with direct links to the runs"
    )
    browse.add_argument("--host", default="127.0.0.1", help="bind address")
    browse.add_argument("--port", type=int, default=5050, help="port (5000 is the model server's)")
    browse.add_argument("--params", type=Path, default=PARAMS_FILE, help=argparse.SUPPRESS)
    browse.set_defaults(run=ui)
    leaderboard = commands.add_parser("runs", help="list the MLflow runs, best first")
    leaderboard.add_argument("--top", type=int, default=20, help="at most this many")
    leaderboard.add_argument(
        "--filter", default="", help="an MLflow search filter, e.g. \"params.model.name = 'cnn'\""
    )
    leaderboard.add_argument("--study", default="", help="list this Optuna study's trials")
    leaderboard.add_argument("--params", type=Path, default=PARAMS_FILE, help=argparse.SUPPRESS)
    leaderboard.set_defaults(run=runs)


def ui(arguments: argparse.Namespace) -> int:
    from mnist_mlops.config import ConfigError, load_params
    from mnist_mlops.tracking.ui import run_ui

    try:
        config = load_params(arguments.params)
    except ConfigError as error:
        print(f"mnist-mlops ui: invalid config: {error}", file=sys.stderr)
        return 2
    return run_ui(
        arguments.host, arguments.port, config.mlflow.experiment_name, config.registry.model_name
    )


def runs(arguments: argparse.Namespace) -> int:
    """Print the leaderboard of the project's MLflow runs."""
    from mlflow.exceptions import MlflowException

    from mnist_mlops.config import load_params
    from mnist_mlops.tracking.leaderboard import COLUMNS, STUDY_COLUMNS, render, rows

    experiment, model = "mnist", "mnist-classifier"
    if arguments.params.exists():
        config = load_params(arguments.params)
        experiment, model = config.mlflow.experiment_name, config.registry.model_name
    study = arguments.study
    try:
        table = rows(experiment, model, arguments.top, arguments.filter, study)
    except MlflowException as error:
        print(f"mnist-mlops runs: {error.message}", file=sys.stderr)
        return 2
    if not table:
        what, hint = (f"trials of study {study!r}", "") if study else ("runs", ": run `make repro`")
        print(f"no {what} in experiment {experiment!r} yet{hint}", file=sys.stderr)
        return 1
    print(render(table, STUDY_COLUMNS if study else COLUMNS))
    return 0
