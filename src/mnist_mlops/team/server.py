"""The team's tracking server: MLflow on PostgreSQL, artifacts proxied, login required.

`mnist-mlops tracking-server` prepares PostgreSQL (the role and the databases
for runs, for users and for `mnist-mlops tune`'s Optuna studies, when an admin
connection is given) and then replaces itself with

    mlflow server --backend-store-uri postgresql://… --artifacts-destination DIR
                  --serve-artifacts --app-name basic-auth --host 127.0.0.1

so teammates need only HTTP access and an account. The admin password comes
from MLFLOW_TRACKING_ADMIN_PASSWORD and MLflow's built-in default is refused.
In production the same command takes a managed PostgreSQL URI and an
S3-compatible `--artifacts-destination` (s3://bucket/path).
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
import tempfile
import urllib.parse
from pathlib import Path

ADMIN_PASSWORD_ENV = "MLFLOW_TRACKING_ADMIN_PASSWORD"
MLFLOW_DEFAULT_ADMIN_PASSWORD = "password1234"
ADMIN_USERNAME = "admin"


class TeamServerError(RuntimeError):
    """The server cannot be set up as asked."""


def admin_password() -> str:
    password = os.environ.get(ADMIN_PASSWORD_ENV, "")
    if not password:
        raise TeamServerError(f"set {ADMIN_PASSWORD_ENV} to the password of the 'admin' account")
    if password == MLFLOW_DEFAULT_ADMIN_PASSWORD or len(password) < 12:
        raise TeamServerError(
            f"{ADMIN_PASSWORD_ENV} must be at least 12 characters and not MLflow's default"
        )
    return password


def auth_database_uri(backend_store_uri: str) -> str:
    """The users database: the runs database's name with `_auth` appended, on the same server."""
    return _beside(backend_store_uri, "_auth")


def optuna_database_uri(backend_store_uri: str) -> str:
    """The studies of `mnist-mlops tune`: the runs database's name with `_optuna` appended."""
    return _beside(backend_store_uri, "_optuna")


def _beside(backend_store_uri: str, suffix: str) -> str:
    parts = urllib.parse.urlsplit(backend_store_uri)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path}{suffix}"))


def prepare_postgres(admin_uri: str, backend_store_uri: str) -> None:
    """Create the backend's role and its databases (runs, users, Optuna studies) if missing."""
    import psycopg2
    from psycopg2 import sql

    backend = urllib.parse.urlsplit(backend_store_uri)
    role, password = backend.username, urllib.parse.unquote(backend.password or "")
    databases = [
        urllib.parse.urlsplit(uri).path.lstrip("/")
        for uri in (
            backend_store_uri,
            auth_database_uri(backend_store_uri),
            optuna_database_uri(backend_store_uri),
        )
    ]
    if not role or not password:
        raise TeamServerError("the backend store URI must name its user and password")
    try:
        connection = psycopg2.connect(admin_uri)
    except psycopg2.OperationalError as error:
        raise TeamServerError(f"cannot connect to PostgreSQL as admin: {error}".strip()) from None
    # CREATE DATABASE cannot run in a transaction: autocommit, and no
    # `with connection` (which would open one).
    connection.autocommit = True
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        if cursor.fetchone() is None:
            cursor.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)),
                (password,),
            )
        for database in databases:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cursor.fetchone() is None:
                cursor.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(database), sql.Identifier(role)
                    )
                )
    finally:
        connection.close()


def write_auth_config(backend_store_uri: str, password: str) -> Path:
    """A private basic-auth config for MLflow; returns its path."""
    handle, name = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")
    os.close(handle)
    path = Path(name)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {auth_database_uri(backend_store_uri)}\n"
        f"admin_username = {ADMIN_USERNAME}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def serve(
    backend_store_uri: str,
    artifacts_destination: str,
    host: str,
    port: int,
    admin_uri: str | None,
) -> None:
    """Prepare the databases and replace this process with the MLflow tracking server."""
    password = admin_password()
    if not backend_store_uri.startswith("postgresql://"):
        raise TeamServerError("the backend store must be a postgresql:// URI")
    if admin_uri:
        prepare_postgres(admin_uri, backend_store_uri)
    # SQLAlchemy 2.1 would pick the psycopg 3 driver for postgresql://; the
    # team extra installs psycopg2.
    store_uri = backend_store_uri.replace("postgresql://", "postgresql+psycopg2://", 1)
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(store_uri, password))
    # The UI's CSRF protection needs a secret. One server can make its own at
    # each start; several behind one address must share one: set it yourself.
    os.environ.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    # MLflow starts its web server by name: find it beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", store_uri),
        *("--artifacts-destination", artifacts_destination, "--serve-artifacts"),
        *("--app-name", "basic-auth", "--host", host, "--port", str(port)),
    ]
    os.execv(command[0], command)
