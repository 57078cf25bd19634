"""The team's tracking server for a module's tests: `mnist-mlops tracking-server` on PostgreSQL."""

import secrets
import sys

import pytest
from mlflow import MlflowClient

from ..conftest import TINY_DATA, free_port, serving, subprocess_env

TINY = (*TINY_DATA, "train.batch_size=32")


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory, request):
    """`mnist-mlops tracking-server` on PostgreSQL; yields its URL and the admin password."""
    admin_uri, postgres_port = postgres
    artifacts = tmp_path_factory.mktemp("team-artifacts")
    password = f"team-{secrets.token_hex(10)}"
    # A database (and role) per module: a module's server never sees another's runs.
    database = request.module.__name__.rsplit(".", 1)[-1].replace("test_", "team_")
    role_password = secrets.token_hex(10)
    backend = f"postgresql://{database}:{role_password}@127.0.0.1:{postgres_port}/{database}"
    port = free_port()
    command = [
        *(sys.executable, "-m", "mnist_mlops", "tracking-server"),
        *("--backend-store-uri", backend, "--admin-uri", admin_uri),
        *("--artifacts-destination", str(artifacts), "--port", str(port)),
    ]
    env = subprocess_env(MLFLOW_TRACKING_ADMIN_PASSWORD=password)
    with serving(command, env, f"http://127.0.0.1:{port}", "/health") as url:
        yield url, password, artifacts


def team_env(team_server, **extra) -> dict:
    url, password, _artifacts = team_server
    credentials = {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": password,
    }
    return subprocess_env(**{**credentials, **extra})


@pytest.fixture
def team_client(team_server, monkeypatch):
    url, password, _artifacts = team_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(url)
