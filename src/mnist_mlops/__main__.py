"""The command line: `python -m mnist_mlops COMMAND` (or `mnist-mlops COMMAND`).

Each DVC stage runs one of the stage commands; their config is read from
params.yaml and validated before any stage code (and TensorFlow) loads.
`serve` serves the registered champion over HTTP and `predict` queries it.
Every command imports what it needs when it runs, so that `serve` works in
an environment that holds only the served model's requirements.
"""

import argparse
import gc
import importlib
import os
import sys
from pathlib import Path

from mnist_mlops.paths import PARAMS_FILE
from mnist_mlops.tune import add_command as add_tune_command

STAGES = {
    "fetch": "download MNIST into data/raw and verify it",
    "preprocess": "validate data/raw and split it into data/processed",
    "train": "train the model and log the run to MLflow",
    "evaluate": "score the model, log it to the same run, register it behind the gate",
}
CHAMPION_URI = "models:/mnist-classifier@champion"


def run_stage(stage: str, params_file: Path) -> int:
    """Run one pipeline stage; errors a user can fix get one line, others their traceback."""
    from mnist_mlops.config import ConfigError, load_params
    from mnist_mlops.fetch import FetchError
    from mnist_mlops.onnx_export import ExportError
    from mnist_mlops.preprocess import DataError
    from mnist_mlops.tracking import store_failure

    try:
        config = load_params(params_file)
        module = importlib.import_module(f"mnist_mlops.{stage}")
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
        failure = store_failure(error)
        if failure is None:
            raise
        print(f"mnist-mlops {stage}: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        print(f"mnist-mlops {stage}: interrupted {interruption}", file=sys.stderr)
        return 130
    return 0


def predict(files: list[Path], url: str, ca: Path | None) -> int:
    """Print the served model's digit and its probability for each image file."""
    from mnist_mlops.client import ClientError, load_image
    from mnist_mlops.client import predict as post

    try:
        predictions = post([load_image(path) for path in files], url, ca=ca)
    except ClientError as error:
        print(f"mnist-mlops predict: {error}", file=sys.stderr)
        return 1
    for path, prediction in zip(files, predictions, strict=True):
        digit = prediction["digit"]
        print(f"{path}: {digit} (probability {prediction['probabilities'][digit]:.3f})")
    return 0


def runs(top: int, filter_string: str, params_file: Path, study: str = "") -> int:
    """Print the leaderboard of the project's MLflow runs."""
    from mlflow.exceptions import MlflowException

    from mnist_mlops.config import load_params
    from mnist_mlops.leaderboard import COLUMNS, STUDY_COLUMNS, render, rows

    experiment, model = "mnist", "mnist-classifier"
    if params_file.exists():
        config = load_params(params_file)
        experiment, model = config.mlflow.experiment_name, config.registry.model_name
    try:
        table = rows(experiment, model, top, filter_string, study)
    except MlflowException as error:
        print(f"mnist-mlops runs: {error.message}", file=sys.stderr)
        return 2
    if not table:
        what, hint = (f"trials of study {study!r}", "") if study else ("runs", ": run `make repro`")
        print(f"no {what} in experiment {experiment!r} yet{hint}", file=sys.stderr)
        return 1
    print(render(table, STUDY_COLUMNS if study else COLUMNS))
    return 0


def add_proxy_commands(commands) -> None:
    proxy = commands.add_parser(
        "proxy", help="HTTPS in front of the model server, the tracking server, or both (nginx)"
    )
    proxy.add_argument(
        "servers",
        nargs="?",
        default="model",
        choices=("model", "tracking", "both"),
        help="which servers to put behind it (%(default)s)",
    )
    proxy.add_argument("--host", default="127.0.0.1", help="bind address (%(default)s)")
    proxy.add_argument("--model-upstream", default="127.0.0.1:5000", help="(%(default)s)")
    proxy.add_argument("--model-port", type=int, default=8443, help="(%(default)s)")
    proxy.add_argument("--tracking-upstream", default="127.0.0.1:5001", help="(%(default)s)")
    proxy.add_argument("--tracking-port", type=int, default=8444, help="(%(default)s)")
    proxy.add_argument("--certificate", type=Path, default=Path("deploy/certs/server.crt"))
    proxy.add_argument("--key", type=Path, default=Path("deploy/certs/server.key"))
    proxy.add_argument(
        "--rate", type=int, default=50, help="requests per second per client (%(default)s)"
    )
    proxy.add_argument(
        "--burst", type=int, default=100, help="requests over the rate (%(default)s)"
    )
    proxy.add_argument(
        "--tracking-max-body", default="5g", help="the tracking server's upload limit (%(default)s)"
    )
    proxy.add_argument("--print-config", action="store_true", help="print nginx.conf and exit")
    proxy.add_argument("--params", type=Path, default=PARAMS_FILE, help=argparse.SUPPRESS)
    certificates = commands.add_parser(
        "certs", help="make a private CA and a certificate for 127.0.0.1 and localhost"
    )
    certificates.add_argument("--directory", type=Path, default=Path("deploy/certs"))


def certs(directory: Path) -> int:
    from mnist_mlops.proxy import ProxyError, make_certificates

    try:
        for path in make_certificates(directory):
            print(path)
    except ProxyError as error:
        print(f"mnist-mlops certs: {error}", file=sys.stderr)
        return 1
    return 0


def tracking_server(arguments: argparse.Namespace) -> int:
    from mnist_mlops.team import TeamServerError, serve

    if not arguments.backend_store_uri:
        print("mnist-mlops tracking-server: give --backend-store-uri", file=sys.stderr)
        return 2
    try:
        serve(
            arguments.backend_store_uri,
            arguments.artifacts_destination,
            arguments.host,
            arguments.port,
            arguments.admin_uri,
        )
    except TeamServerError as error:
        print(f"mnist-mlops tracking-server: {error}", file=sys.stderr)
        return 2
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-mlops", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage, help_text in STAGES.items():
        command = commands.add_parser(stage, help=help_text, description=help_text)
        command.add_argument(
            "--params", type=Path, default=PARAMS_FILE, help="the composed config (%(default)s)"
        )
    serving = commands.add_parser("serve", help="serve the champion model over HTTP")
    serving.add_argument("--model-uri", default=CHAMPION_URI, help="(%(default)s)")
    serving.add_argument(
        "--host",
        default=os.environ.get("MNIST_SERVE_HOST", "127.0.0.1"),
        help="bind address (%(default)s; MNIST_SERVE_HOST sets the default)",
    )
    serving.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("MNIST_SERVE_PORT", "5000")),
        help="(%(default)s; MNIST_SERVE_PORT sets the default)",
    )
    client = commands.add_parser("predict", help="classify digit images with the served model")
    client.add_argument("files", nargs="+", type=Path, metavar="IMAGE", help="PNG, JPEG, …")
    client.add_argument("--url", default="http://127.0.0.1:5000", help="(%(default)s)")
    client.add_argument(
        "--ca", type=Path, help="the CA that signed an https:// server's certificate"
    )
    add_proxy_commands(commands)
    add_tune_command(commands)
    browse = commands.add_parser(
        "ui", help="the MLflow UI on the project's store, with direct links to the runs"
    )
    browse.add_argument("--host", default="127.0.0.1", help="bind address (%(default)s)")
    browse.add_argument("--port", type=int, default=5000, help="(%(default)s)")
    browse.add_argument("--params", type=Path, default=PARAMS_FILE, help=argparse.SUPPRESS)
    leaderboard = commands.add_parser("runs", help="list the MLflow runs, best first")
    leaderboard.add_argument("--top", type=int, default=20, help="at most this many (%(default)s)")
    leaderboard.add_argument(
        "--filter", default="", help="an MLflow search filter, e.g. \"params.model.name = 'cnn'\""
    )
    leaderboard.add_argument("--study", default="", help="list this Optuna study's trials")
    leaderboard.add_argument("--params", type=Path, default=PARAMS_FILE, help=argparse.SUPPRESS)
    team = commands.add_parser(
        "tracking-server", help="run the team's MLflow server (PostgreSQL, login required)"
    )
    team.add_argument(
        "--backend-store-uri",
        default=os.environ.get("MNIST_TEAM_BACKEND_STORE_URI"),
        help="postgresql://USER:PASSWORD@HOST:PORT/DATABASE (MNIST_TEAM_BACKEND_STORE_URI)",
    )
    team.add_argument(
        "--admin-uri",
        default=os.environ.get("MNIST_TEAM_POSTGRES_ADMIN_URI"),
        help="a PostgreSQL superuser URI, to create the role and databases "
        "(MNIST_TEAM_POSTGRES_ADMIN_URI)",
    )
    team.add_argument("--artifacts-destination", default="mlflow-team-artifacts")
    team.add_argument("--host", default="127.0.0.1", help="bind address (%(default)s)")
    team.add_argument("--port", type=int, default=5001, help="(%(default)s)")
    arguments = parser.parse_args(argv)

    if arguments.command == "tracking-server":
        return tracking_server(arguments)
    if arguments.command == "runs":
        return runs(arguments.top, arguments.filter, arguments.params, arguments.study)
    if arguments.command == "tune":
        from mnist_mlops.tune import main_tune

        return main_tune(arguments)
    if arguments.command == "serve":
        from mnist_mlops.serve import serve

        return serve(arguments.model_uri, arguments.host, arguments.port)
    if arguments.command == "predict":
        return predict(arguments.files, arguments.url, arguments.ca)
    if arguments.command == "proxy":
        from mnist_mlops.proxy import main_proxy

        return main_proxy(arguments.servers, arguments)
    if arguments.command == "certs":
        return certs(arguments.directory)
    if arguments.command == "ui":
        from mnist_mlops.config import load_params
        from mnist_mlops.ui import run_ui

        config = load_params(arguments.params)
        return run_ui(
            arguments.host,
            arguments.port,
            config.mlflow.experiment_name,
            config.registry.model_name,
        )
    status = run_stage(arguments.command, arguments.params)
    # Python's last garbage collection would walk every object that MLflow,
    # TensorFlow and the rest created: 0.5–1 s at the end of every stage. The
    # stage is done (outputs renamed into place, files closed, run ended), so
    # those objects are frozen out of it; exit handlers still run.
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(main())
