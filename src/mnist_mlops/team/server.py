"""The team's tracking server: MLflow on PostgreSQL, artifacts proxied, login required.

`mnist-mlops tracking-server` prepares PostgreSQL (the role and the databases
for runs, for users and for `mnist-mlops tune`'s Optuna studies, when an admin
connection is given) and then replaces itself with

    mlflow server --artifacts-destination DIR --serve-artifacts
                  --app-name basic-auth --host 127.0.0.1

with the database's URI in its environment and the login's config in a
memory file, so that no password appears on a command line or on disk;
teammates need only HTTP access and an account. The admin password comes
from MLFLOW_TRACKING_ADMIN_PASSWORD and MLflow's built-in default is refused.
With an `s3://bucket/prefix` destination (the team's `mnist-mlops
object-store`, or any S3) the server holds the keys, checks the bucket before
it starts, and can first import a previous local destination
(`--import-artifacts`), so that old runs stay readable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sys
import urllib.parse
from pathlib import Path

ADMIN_PASSWORD_ENV = "MLFLOW_TRACKING_ADMIN_PASSWORD"
MLFLOW_DEFAULT_ADMIN_PASSWORD = "password1234"
ADMIN_USERNAME = "admin"
S3_KEY_ENVS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# How long a worker trusts a login it checked (a scrypt hash, 0.1 CPU-s here, which
# every request of a run's per-second logging paid): a password changed or a user
# deleted through another worker is still let in for at most this long.
AUTH_CACHE_SECONDS = 30


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
    check_login(backend_store_uri, role)


def check_login(backend_store_uri: str, role: str) -> None:
    """TeamServerError in one line if the backend's role cannot log in with its password.

    An existing role keeps its password (this never changes a teammate's), so
    a URI with another one fails here, not in a traceback from every worker.
    """
    import psycopg2

    parts = urllib.parse.urlsplit(backend_store_uri)
    try:
        psycopg2.connect(urllib.parse.urlunsplit(parts._replace(scheme="postgresql"))).close()
    except psycopg2.OperationalError as error:
        reason = str(error).strip().splitlines()[0]
        raise TeamServerError(
            f"PostgreSQL refuses the backend store URI's login as {role!r} ({reason}); "
            "an existing role keeps its password: use that one, or change it with ALTER ROLE"
        ) from None


def auth_config(backend_store_uri: str, password: str) -> str:
    """MLflow's basic-auth config: the users database (its password included) and the admin."""
    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {auth_database_uri(backend_store_uri)}\n"
        f"admin_username = {ADMIN_USERNAME}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )


def private_file(content: str) -> str:
    """A path to `content` that lives exactly as long as this process, and no file on disk.

    An anonymous memory file (memfd) kept open across `exec`: the server and
    the workers it starts read it as /proc/PID/fd/N, which only this user (and
    root) can open, and it is gone with the process however it ends. A file
    in /tmp outlived every start of the server, the admin password inside.
    """
    descriptor = os.memfd_create("mlflow-auth.ini", 0)
    os.write(descriptor, content.encode())
    os.set_inheritable(descriptor, True)
    return f"/proc/{os.getpid()}/fd/{descriptor}"


def check_s3_destination(destination: str, endpoint_url: str | None) -> tuple[str, str]:
    """(bucket, prefix) of an s3:// destination the server's keys can write; TeamServerError if not.

    The keys come from the server's environment alone (AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, e.g. `mnist-mlops object-store --keys tracking`);
    clients never need them, because every artifact goes through the server.
    """
    missing = [name for name in S3_KEY_ENVS if not os.environ.get(name)]
    if missing:
        raise TeamServerError(
            f"an s3:// artifacts destination needs {' and '.join(missing)} in the server's "
            "environment (the team store: mnist-mlops object-store --keys tracking)"
        )
    if endpoint_url:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint_url
    parts = urllib.parse.urlsplit(destination)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    client = _s3_client()
    where = os.environ.get("MLFLOW_S3_ENDPOINT_URL", "AWS S3")
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=1)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TeamServerError(f"cannot reach {destination} at {where}: {reason}") from None
    return bucket, prefix


def import_artifacts(folder: Path, bucket: str, prefix: str) -> tuple[int, int]:
    """Copy a local artifacts destination into the bucket under `prefix`; (copied, already there).

    Runs keep artifact URIs relative to the destination (mlflow-artifacts:/…),
    so after this copy the server on S3 reads every old run's artifacts. A
    file already there with the same size is skipped: run it again after an
    interruption.
    """
    if not folder.is_dir():
        raise TeamServerError(f"nothing to import: {folder} is not a folder")
    import botocore.exceptions

    client = _s3_client()
    copied = skipped = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        key = "/".join(filter(None, (prefix, path.relative_to(folder).as_posix())))
        try:
            if client.head_object(Bucket=bucket, Key=key)["ContentLength"] == path.stat().st_size:
                skipped += 1
                continue
        except botocore.exceptions.ClientError:
            pass
        client.upload_file(str(path), bucket, key)
        copied += 1
    return copied, skipped


def _s3_client():
    import boto3
    from botocore.config import Config

    settings = Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=60)
    return boto3.client(
        "s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None, config=settings
    )


def serve(
    backend_store_uri: str,
    artifacts_destination: str,
    host: str,
    port: int,
    admin_uri: str | None,
    s3_endpoint_url: str | None = None,
    import_from: Path | None = None,
    workers: int = 1,
) -> None:
    """Prepare the databases and replace this process with the MLflow tracking server."""
    from mnist_mlops.processes import port_taken

    password = admin_password()
    if taken := port_taken(host, port, "--port"):
        raise TeamServerError(taken)
    if not backend_store_uri.startswith("postgresql://"):
        raise TeamServerError("the backend store must be a postgresql:// URI")
    if artifacts_destination.startswith("s3://"):
        bucket, prefix = check_s3_destination(artifacts_destination, s3_endpoint_url)
        if import_from is not None:
            copied, skipped = import_artifacts(import_from, bucket, prefix)
            where = f"from {import_from} into {artifacts_destination}"
            print(f"imported {copied} artifact files {where} ({skipped} already there)", flush=True)
    elif import_from is not None:
        raise TeamServerError("--import-artifacts needs an s3:// --artifacts-destination")
    if admin_uri:
        prepare_postgres(admin_uri, backend_store_uri)
    # SQLAlchemy 2.1 would pick psycopg 3 for postgresql://; the team extra has psycopg2.
    store_uri = backend_store_uri.replace("postgresql://", "postgresql+psycopg2://", 1)
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = private_file(auth_config(store_uri, password))
    # In the environment, never on the command line, where any local user reads it.
    os.environ["MLFLOW_BACKEND_STORE_URI"] = store_uri
    # The UI's CSRF protection needs a secret. One server can make its own at
    # each start; several behind one address must share one: set it yourself.
    os.environ.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    # No GenAI job runner (8 more processes, 1.5 GB, about 10 s of CPU at each
    # start): the project runs no server-side GenAI jobs. Set it to true to have them.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    webhook_settings(password)
    # MLflow starts its web server by name: find it beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--artifacts-destination", artifacts_destination, "--serve-artifacts"),
        *("--app-name", "basic-auth", "--host", host, "--port", str(port)),
        *("--workers", str(workers)),
    ]
    os.execv(command[0], command)


def webhook_settings(password: str) -> None:
    """Let the registry's webhooks reach `mnist-mlops serve` (serving/webhook.py), if not set.

    MLflow calls webhooks over HTTPS to public addresses only, against
    server-side request forgery; a server following the champion listens on
    127.0.0.1 over HTTP (HTTPS is the proxy's job). Allowing both here reaches
    nothing new: only an admin may register a webhook on this server
    (basic-auth), and an admin runs the server already.
    """
    os.environ.setdefault("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    os.environ.setdefault("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "https,http")
    # Webhooks are cached per event, 60 s by default: one registered meanwhile is not called.
    os.environ.setdefault("MLFLOW_WEBHOOK_CACHE_TTL", "2")
    # Their secrets are stored encrypted. Without a key MLflow makes one per
    # process, which no other worker and no restarted server can read: derive
    # one from the admin password (a new password orphans the stored secrets;
    # each `serve` registers anew at its start).
    key = hmac.new(password.encode(), b"mlflow webhook secrets", hashlib.sha256).digest()
    os.environ.setdefault(
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", base64.urlsafe_b64encode(key).decode()
    )
