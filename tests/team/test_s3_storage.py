"""The team's storage on S3: MLflow's artifacts through the tracking server, and the DVC remote.

Real SeaweedFS (`mnist-mlops object-store`), real PostgreSQL and the real
tracking server, all on 127.0.0.1. Clients hold no S3 keys: only the
tracking URI and their MLflow login.
"""

import contextlib
import filecmp
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mnist_mlops.team.object_store import keys_for, s3_client

from ..conftest import (
    client_env,
    free_port,
    run,
    serving,
    subprocess_env,
    tracking_server,
    without_s3_keys,
)
from .test_object_store import free_port_run, object_store, weed_of
from .test_team import first_images, mnist_runs, tiny_clone


@pytest.fixture(scope="module")
def s3_team(postgres, tmp_path_factory):
    """The team's tracking server with its artifacts in the store's `mlflow` bucket."""
    directory = tmp_path_factory.mktemp("s3-team")
    with object_store(directory) as (endpoint, secret, _process, _port):
        port = free_port()
        command, env, password = tracking_server(
            postgres,
            "mlflow_s3",
            "s3://mlflow/artifacts",
            port,
            **keys_for(secret, "tracking").environment(),
        )
        command += ["--s3-endpoint-url", endpoint]
        with serving(command, env, f"http://127.0.0.1:{port}", "/health") as url:
            yield url, password, endpoint, secret


@pytest.mark.heavy
def test_the_pipeline_and_serving_work_from_a_client_without_s3_keys(
    s3_team, http_mirror, tmp_path, monkeypatch
):
    url, password, endpoint, secret = s3_team
    project = tiny_clone(tmp_path / "clone")
    env = client_env(url, password, MNIST_MIRROR=http_mirror)
    run(["dvc", "repro"], project, env)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(url)
    (logged,) = mnist_runs(client)
    assert logged.info.status == "FINISHED"
    assert logged.info.artifact_uri.startswith("mlflow-artifacts:")
    champion = client.get_model_version_by_alias("mnist-classifier", "champion")
    assert champion.run_id == logged.info.run_id
    # The artifacts are objects in the mlflow bucket, under the destination's prefix.
    store = s3_client(endpoint, keys_for(secret, "tracking"))
    pages = store.get_paginator("list_objects_v2").paginate(Bucket="mlflow", Prefix="artifacts/")
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    assert any(key.endswith("/MLmodel") for key in keys), keys
    assert any(key.endswith("model.onnx") for key in keys), keys

    port = free_port()
    command = [sys.executable, "-m", "mnist_mlops", "serve", "--port", str(port), "--no-log"]
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping", cwd=project) as served:
        request = urllib.request.Request(
            f"{served}/invocations",
            data=first_images(project),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert len(json.load(response)["predictions"]) == 3
            assert response.headers["X-Model-Version"] == f"mnist-classifier/{champion.version}"


@pytest.mark.heavy
def test_an_unreachable_or_forbidden_bucket_stops_the_server_in_one_line(s3_team, postgres):
    _url, _password, endpoint, secret = s3_team
    port = free_port()
    alice = keys_for(secret, "alice").environment()
    command, env, _password = tracking_server(postgres, "mlflow_s3", "s3://mlflow/x", port, **alice)
    result = run(
        [*command, "--s3-endpoint-url", endpoint], Path.cwd(), env, check=False, timeout=60
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mnist-mlops tracking-server: cannot reach s3://mlflow/x at ")
    assert "AccessDenied" in line or "Access Denied" in line
    no_keys = subprocess_env(MLFLOW_TRACKING_ADMIN_PASSWORD=env["MLFLOW_TRACKING_ADMIN_PASSWORD"])
    result = run(command, Path.cwd(), without_s3_keys(no_keys), check=False, timeout=60)
    assert result.returncode == 2
    assert "needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.stderr


@pytest.mark.heavy
def test_moving_a_team_to_s3_keeps_old_runs_readable(postgres, tmp_path, monkeypatch):
    old_artifacts = tmp_path / "old-artifacts"
    port = free_port()
    command, env, password = tracking_server(postgres, "mlflow_move", str(old_artifacts), port)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    url = f"http://127.0.0.1:{port}"
    with serving(command, env, url, "/health"):
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("before-the-move")
        with mlflow.start_run() as old:
            mlflow.log_text("logged on the local destination", "notes/old.txt")
    assert list(old_artifacts.rglob("old.txt"))

    with object_store(tmp_path) as (endpoint, secret, _process, _port):
        keys = keys_for(secret, "tracking").environment()
        moved, env, _ = tracking_server(
            postgres, "mlflow_move", "s3://mlflow/team", port, admin_password=password, **keys
        )
        moved += ["--s3-endpoint-url", endpoint, "--import-artifacts", str(old_artifacts)]
        with serving(moved, env, url, "/health", log=tmp_path / "moved.log"):
            assert not os.environ.get("AWS_ACCESS_KEY_ID"), "the test client holds no S3 keys"
            text = mlflow.artifacts.load_text(f"runs:/{old.info.run_id}/notes/old.txt")
            assert text == "logged on the local destination"
            with mlflow.start_run() as new:
                mlflow.log_text("logged on S3", "notes/new.txt")
            assert mlflow.artifacts.load_text(f"runs:/{new.info.run_id}/notes/new.txt")
        mlflow.set_tracking_uri(None)
        assert "imported 1 artifact files" in (tmp_path / "moved.log").read_text()
        store = s3_client(endpoint, keys_for(secret, "tracking"))
        listed = store.list_objects_v2(Bucket="mlflow", Prefix="team/")["Contents"]
        assert {Path(item["Key"]).name for item in listed} >= {"old.txt", "new.txt"}


def remote(project: Path, endpoint: str, keys, env: dict) -> dict:
    """The committed `team` remote pointed at this store; the environment with the user's keys.

    As docs/team.md does it: the keys live in the shell's environment
    (`eval "$(mnist-mlops object-store --keys alice)"`), never in a file.
    """
    run(["dvc", "remote", "modify", "--local", "team", "endpointurl", endpoint], project, env)
    assert keys.secret_key not in (project / ".dvc" / "config.local").read_text()
    return {**env, **keys.environment()}


# The push test's big file, and how much of it lands before the store is killed: more than
# the rest of the tiny project (about 5 MB), less than the first of DVC's 50 MB parts (s3fs).
BIG_MEGABYTES = 128
LANDED_MEGABYTES = 16


def megabytes_in(folder: Path) -> float:
    """What the store's files hold, read while it writes (a file may go between list and stat)."""
    total = 0
    for parent, _folders, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total / 2**20


@pytest.mark.heavy
def test_dvc_push_and_pull_through_the_store_and_a_store_killed_mid_push(tmp_path, http_mirror):
    env = without_s3_keys(subprocess_env(MNIST_MIRROR=http_mirror))
    first = tiny_clone(tmp_path / "first")
    run(["dvc", "repro"], first, env)
    big = first / "data" / "big.bin"
    big.write_bytes(os.urandom(BIG_MEGABYTES * 1024 * 1024))
    run(["dvc", "add", "data/big.bin"], first, env)
    run(["git", "add", "-A"], first, env)
    run(["git", "commit", "-q", "-m", "data"], first, env)
    port = free_port_run()
    with object_store(tmp_path, port) as (endpoint, secret, process, _port):
        alice = keys_for(secret, "alice")
        with_keys = remote(first, endpoint, alice, env)
        stored = megabytes_in(tmp_path / "store")
        push = subprocess.Popen(
            ["dvc", "push", "-r", "team"],
            cwd=first,
            env=with_keys,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Killed once the big file's first part has landed, and not before.
        deadline = time.monotonic() + 300
        while megabytes_in(tmp_path / "store") < stored + LANDED_MEGABYTES:
            assert push.poll() is None, "the push ended before the store could be killed"
            assert time.monotonic() < deadline, "nothing of the big file landed in 300 s"
            time.sleep(0.02)
        assert push.poll() is None, "the push ended before the store could be killed"
        os.kill(weed_of(process), signal.SIGKILL)
        started = time.monotonic()
        _output, errors = push.communicate(timeout=300)
        failed_after = time.monotonic() - started
    assert push.returncode != 0
    assert "ERROR" in errors and failed_after < 120, (errors, failed_after)

    with object_store(tmp_path, port) as (endpoint, secret, _process, _port):
        run(["dvc", "push", "-r", "team"], first, with_keys)
        second = tmp_path / "second"
        run(["git", "clone", "-q", str(first), str(second)], tmp_path, env)
        run(["dvc", "pull", "-r", "team"], second, remote(second, endpoint, alice, env))
    for folder in ("data/raw", "data/processed", "models"):
        comparison = filecmp.dircmp(first / folder, second / folder)
        assert comparison.left_list and not comparison.diff_files and not comparison.left_only
        equal, _different, _errors = filecmp.cmpfiles(
            first / folder, second / folder, comparison.common_files, shallow=False
        )
        assert sorted(equal) == sorted(comparison.common_files)
    assert filecmp.cmp(first / "data" / "big.bin", second / "data" / "big.bin", shallow=False)
