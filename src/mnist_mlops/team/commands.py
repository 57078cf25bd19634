"""The team wing's command: `tracking-server`, MLflow on PostgreSQL with a login."""

from __future__ import annotations

import argparse
import os
import sys

BACKEND_STORE_URI_ENV = "MNIST_TEAM_BACKEND_STORE_URI"
ADMIN_URI_ENV = "MNIST_TEAM_POSTGRES_ADMIN_URI"


def add_commands(commands: argparse._SubParsersAction) -> None:
    team = commands.add_parser(
        "tracking-server", help="run the team's MLflow server (PostgreSQL, login required)"
    )
    team.add_argument(
        "--backend-store-uri",
        help="postgresql://USER:PASSWORD@HOST:PORT/DATABASE (or MNIST_TEAM_BACKEND_STORE_URI)",
    )
    team.add_argument(
        "--admin-uri",
        help="a PostgreSQL superuser URI, to create the role and databases "
        "(or MNIST_TEAM_POSTGRES_ADMIN_URI)",
    )
    team.add_argument(
        "--artifacts-destination",
        default="mlflow-team-artifacts",
        help="where the server keeps the artifacts it proxies",
    )
    team.add_argument("--host", default="127.0.0.1", help="bind address")
    team.add_argument("--port", type=int, default=5001, help="port")
    team.set_defaults(run=tracking_server)


def tracking_server(arguments: argparse.Namespace) -> int:
    from mnist_mlops.team.server import TeamServerError, serve

    # Read here, not as the options' defaults: `--help` prints defaults, and
    # these URIs hold passwords.
    backend_store_uri = arguments.backend_store_uri or os.environ.get(BACKEND_STORE_URI_ENV)
    admin_uri = arguments.admin_uri or os.environ.get(ADMIN_URI_ENV)
    if not backend_store_uri:
        print("mnist-mlops tracking-server: give --backend-store-uri", file=sys.stderr)
        return 2
    try:
        serve(
            backend_store_uri,
            arguments.artifacts_destination,
            arguments.host,
            arguments.port,
            admin_uri,
        )
    except TeamServerError as error:
        print(f"mnist-mlops tracking-server: {error}", file=sys.stderr)
        return 2
    return 1
