"""The team wing's commands: `tracking-server` (MLflow on PostgreSQL with a login) and
`object-store` (SeaweedFS's S3 gateway for MLflow's artifacts and the DVC remote)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

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
    team.add_argument(
        "--s3-endpoint-url",
        help="the S3 endpoint of an s3:// destination, e.g. http://127.0.0.1:8333 "
        "(or MLFLOW_S3_ENDPOINT_URL; AWS S3 without either)",
    )
    team.add_argument(
        "--import-artifacts",
        type=Path,
        metavar="FOLDER",
        help="first copy a previous local artifacts destination into the s3:// one",
    )
    team.add_argument("--host", default="127.0.0.1", help="bind address")
    team.add_argument("--port", type=int, default=5001, help="port")
    team.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="web server processes (one per core)",
    )
    team.set_defaults(run=tracking_server)
    add_object_store_command(commands)


def add_object_store_command(commands: argparse._SubParsersAction) -> None:
    about = "run the team's S3 object store (SeaweedFS) for MLflow's artifacts and the DVC remote"
    store = commands.add_parser("object-store", help=about, description=about)
    store.add_argument(
        "--data", type=Path, default=Path("object-store"), help="where the store keeps its data"
    )
    store.add_argument(
        "--secret-file",
        type=Path,
        default=Path("object-store.secret"),
        help="the secret every key is derived from (never committed; chmod 600)",
    )
    store.add_argument(
        "--users",
        default="",
        help="comma-separated names that get keys to the dvc bucket (none by default)",
    )
    store.add_argument(
        "--host", default="127.0.0.1", help="where the S3 port listens (all others: 127.0.0.1)"
    )
    store.add_argument(
        "--port", type=int, default=8333, help="the S3 port; the next 7 are internal"
    )
    store.add_argument(
        "--keys",
        metavar="NAME",
        help="print NAME's keys (tracking, serving, or a user) as `export` lines for a shell "
        "and exit",
    )
    store.set_defaults(run=object_store)


def object_store(arguments: argparse.Namespace) -> int:
    from mnist_mlops.team.object_store import ObjectStoreError, keys_for, read_secret, run

    users = [name.strip() for name in arguments.users.split(",") if name.strip()]
    try:
        if arguments.keys:
            keys = keys_for(read_secret(arguments.secret_file), arguments.keys)
            # `export`: lines that `eval "$(…)"` turns into variables the
            # commands started next (tracking-server, dvc) see too.
            for name, value in keys.environment().items():
                print(f"export {name}={shlex.quote(value)}")
            return 0
        return run(arguments.data, arguments.secret_file, users, arguments.host, arguments.port)
    except ObjectStoreError as error:
        print(f"mnist-mlops object-store: {error}", file=sys.stderr)
        return 2


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
            arguments.s3_endpoint_url,
            arguments.import_artifacts,
            arguments.workers,
        )
    except TeamServerError as error:
        print(f"mnist-mlops tracking-server: {error}", file=sys.stderr)
        return 2
    return 1
