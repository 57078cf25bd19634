"""No secret of the team's servers where another local user can read it.

`/proc/PID/cmdline` is readable by every user of the machine, and /tmp is
shared: the tracking server's database password and admin password must be
in neither, during its life or after it.
"""

import glob
import secrets
import sys
import tempfile
from pathlib import Path

import pytest

from ..conftest import command_lines, free_port, serving, subprocess_env


def auth_files() -> list[str]:
    return glob.glob(str(Path(tempfile.gettempdir()) / "mlflow-auth-*"))


@pytest.mark.heavy
def test_the_tracking_server_keeps_its_secrets_off_command_lines_and_out_of_tmp(postgres):
    admin_uri, postgres_port = postgres
    role_password, admin_password = secrets.token_hex(10), f"team-{secrets.token_hex(10)}"
    backend = f"postgresql://secrets:{role_password}@127.0.0.1:{postgres_port}/secrets"
    port = free_port()
    before = auth_files()
    # The URIs go in the environment, as docs/team.md starts the server.
    command = [sys.executable, "-m", "mnist_mlops", "tracking-server", "--port", str(port)]
    command += ["--artifacts-destination", tempfile.mkdtemp(prefix="mnist-secrets-")]
    env = subprocess_env(
        MLFLOW_TRACKING_ADMIN_PASSWORD=admin_password,
        MNIST_TEAM_BACKEND_STORE_URI=backend,
        MNIST_TEAM_POSTGRES_ADMIN_URI=admin_uri,
    )
    with serving(command, env, f"http://127.0.0.1:{port}", "/health"):
        # Every process on the machine, the server's workers included.
        shown = command_lines()
        assert f"--port {port}" in shown and "mlflow" in shown
        postgres_password = admin_uri.split("@")[0].rsplit(":", 1)[1]
        for secret in (role_password, admin_password, postgres_password):
            assert secret not in shown
        assert auth_files() == before
    assert auth_files() == before
