"""No secret of the team's servers where another local user can read it.

`/proc/PID/cmdline` is readable by every user of the machine, and /tmp is
shared: the tracking server's database password and admin password must be
in neither, during its life or after it.
"""

import glob
import os
import secrets
import sys
import tempfile
from pathlib import Path

import pytest

from ..conftest import command_lines, descendants, free_port, serving, subprocess_env


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
        # And no more of them than it needs: one web worker per core, no GenAI job runner.
        workers = server_processes(port)
        assert not [line for line in workers if "huey" in line or "_job_runner" in line], workers
        assert len([line for line in workers if "spawn_main" in line]) == os.cpu_count(), workers
    assert auth_files() == before


def server_processes(port: int) -> list[str]:
    """The command lines of the MLflow server on `port` and of every process below it."""
    (launcher,) = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and "server\0--artifacts-destination" in cmdline(entry.name)
        and f"--port\0{port}\0" in cmdline(entry.name)
    ]
    return [cmdline(pid).replace("\0", " ") for pid in descendants(launcher)]


def cmdline(pid) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
