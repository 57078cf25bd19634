"""A server whose port is taken says so in one line, before any banner, and exits non-zero.

The tour runs `make ui` and `make serve` side by side (5050 and 5000); a
second copy of either, or any server on a taken port, must not print
"serving on" or "startup complete" first.
"""

import re
import shutil
import socket
import sys
from contextlib import contextmanager

import pytest
from mlflow import MlflowClient

from .conftest import REPO_ROOT, run, subprocess_env


@contextmanager
def taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_the_ui_and_the_tracking_server_refuse_a_taken_port_in_one_line(tmp_path):
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    env = subprocess_env(
        MLFLOW_TRACKING_ADMIN_PASSWORD="a-long-enough-password",
        MNIST_TEAM_BACKEND_STORE_URI="postgresql://team:secret@127.0.0.1:9/team",
    )
    for command, name in (
        (["ui"], "ui"),
        (
            ["tracking-server", "--artifacts-destination", str(tmp_path / "artifacts")],
            "tracking-server",
        ),
    ):
        with taken_port() as port:
            result = run(
                [sys.executable, "-m", "mnist_mlops", *command, "--port", str(port)],
                tmp_path,
                env,
                check=False,
                timeout=120,
            )
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and lines[-1].startswith(
            f"mnist-mlops {name}: cannot listen on 127.0.0.1:{port}"
        )
        assert "Address already in use" in lines[-1] and "another server?" in lines[-1]
        assert "MLflow UI on" not in result.stdout and "Uvicorn running" not in result.stderr


def test_make_docs_refuses_a_taken_port_in_one_line():
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 8000))
        except OSError:
            pytest.skip("something else holds 127.0.0.1:8000 already")
        taken.listen()
        result = run(["make", "-s", "docs"], REPO_ROOT, subprocess_env(), check=False, timeout=300)
    assert result.returncode != 0
    # make's own lines ("make: ***", or "make[1]: ***" under `make test`) aside.
    lines = [line for line in result.stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", line)]
    assert lines == [
        "make docs: cannot listen on 127.0.0.1:8000: Address already in use (another server? "
        "choose another port: make docs DOCS_PORT=…)"
    ]
    assert "Serving on" not in result.stdout + result.stderr
