"""The tracking wing's commands: `ui` (the MLflow UI with direct links), `runs`, `registry`."""

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
    registry = commands.add_parser("registry", help="the model registry: the champion's history")
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    history = actions.add_parser(
        "history",
        help="every move of @champion, oldest first",
        description="Every move of the alias champion, oldest first: when, from which version "
        "to which, why, by which rule, by whom, and the scores it was judged on.",
    )
    history.add_argument("--model", default="", help="the registered model (params.yaml's)")
    history.add_argument("--json", action="store_true", help="one JSON object per move")
    history.add_argument("--params", type=Path, default=PARAMS_FILE, help=argparse.SUPPRESS)
    history.set_defaults(run=champion_history)


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


def champion_history(arguments: argparse.Namespace) -> int:
    """Print the champion's history (tracking/history.py)."""
    import json
    from dataclasses import asdict

    from mlflow.exceptions import MlflowException

    from mnist_mlops.config import load_params
    from mnist_mlops.tracking import history
    from mnist_mlops.tracking.store import missing_store, tracking_uri

    model = arguments.model
    if not model:
        model = "mnist-classifier"
        if arguments.params.exists():
            model = load_params(arguments.params).registry.model_name
    if missing := missing_store():
        print(f"mnist-mlops registry: {missing}", file=sys.stderr)
        return 1
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    try:
        moves = history.moves(MlflowClient(), model)
    except MlflowException as error:
        print(f"mnist-mlops registry: {error.message}", file=sys.stderr)
        return 2
    if not moves:
        print(
            f"no move of {model}@champion recorded yet: "
            "the history begins at the next evaluation (`make repro`)",
            file=sys.stderr,
        )
        return 1
    for move in moves:
        print(json.dumps(asdict(move), sort_keys=True) if arguments.json else move.line())
    return 0
