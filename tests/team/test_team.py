"""Team mode against a real server: PostgreSQL + `mlflow server` + basic-auth, on 127.0.0.1.

PostgreSQL comes from Debian's `postgresql` package, which .ci/run installs.
Elsewhere these tests skip with the reason when it cannot be started.
"""

import base64
import http.client
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mnist_mlops.team.server import AUTH_CACHE_SECONDS
from mnist_mlops.tracking import history

from ..conftest import (
    REPO_ROOT,
    compose_config,
    copy_project,
    free_port,
    proxy_command,
    run,
    serving,
    subprocess_env,
    tls_context,
)
from .conftest import TINY, team_env


def tiny_clone(directory: Path) -> Path:
    project = copy_project(directory)
    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*TINY, "train.epochs=1")))
    return project


def mnist_runs(client):
    experiment = client.get_experiment_by_name("mnist")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.heavy
def test_the_pipeline_tracks_registers_and_serves_through_the_server(
    team_server, team_client, http_mirror, tmp_path
):
    project = tiny_clone(tmp_path / "clone")
    env = team_env(team_server, MNIST_MIRROR=http_mirror)
    run(["dvc", "repro"], project, env)

    (logged,) = mnist_runs(team_client)
    assert logged.info.status == "FINISHED"
    assert logged.info.artifact_uri.startswith("mlflow-artifacts:")
    assert len(team_client.get_metric_history(logged.info.run_id, "loss")) == 1
    champion = team_client.get_model_version_by_alias("mnist-classifier", "champion")
    assert champion.tags["run_id"] == logged.info.run_id
    _url, _password, artifacts = team_server
    assert any(artifacts.rglob("MLmodel")), "artifacts are stored by the server, not the client"
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()

    board = run([sys.executable, "-m", "mnist_mlops", "runs"], project, env).stdout
    assert logged.info.run_name in board and board.rstrip().endswith("*")

    port = free_port()
    command = [
        *("mlflow", "models", "serve", "-m", "models:/mnist-classifier@champion"),
        *("--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)),
    ]
    body = first_images(project)
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping") as url:
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert len(json.load(response)["predictions"]) == 3


def first_images(project: Path) -> bytes:
    """The first three processed test images of a project, as an `inputs` request body."""
    import numpy as np

    with np.load(project / "data/processed/test.npz", allow_pickle=False) as arrays:
        return json.dumps({"inputs": arrays["images"][:3].tolist()}).encode()


@pytest.mark.heavy
def test_two_working_copies_log_at_the_same_time(team_server, team_client, http_mirror, tmp_path):
    before = {item.info.run_id for item in mnist_runs(team_client)}
    env = team_env(team_server, MNIST_MIRROR=http_mirror)
    clones = [tiny_clone(tmp_path / name) for name in ("alice", "bob")]
    processes = [
        subprocess.Popen(
            ["dvc", "repro"],
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for clone in clones
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    new = [item for item in mnist_runs(team_client) if item.info.run_id not in before]
    assert len(new) == 2
    assert {item.info.status for item in new} == {"FINISHED"}
    recorded = {
        json.loads((clone / "models/mlflow_run.json").read_text())["run_id"] for clone in clones
    }
    assert recorded == {item.info.run_id for item in new}
    versions = {
        version.tags["run_id"]
        for version in team_client.search_model_versions("name = 'mnist-classifier'")
    }
    assert recorded <= versions


def basic_auth(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.mark.parametrize(
    "headers", [{}, basic_auth("admin", "wrong password")], ids=["none", "wrong"]
)
@pytest.mark.heavy
def test_requests_without_valid_credentials_are_refused(team_server, headers):
    url, password, _artifacts = team_server
    endpoint = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(endpoint, headers=headers), timeout=10)
    assert refused.value.code == 401
    allowed = urllib.request.Request(endpoint, headers=basic_auth("admin", password))
    with urllib.request.urlopen(allowed, timeout=10) as response:
        assert response.status == 200


def status_of(endpoint: str, headers: dict, method: str = "GET", body: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    headers = {**headers, "Content-Type": "application/json"}
    request = urllib.request.Request(endpoint, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.heavy
def test_a_changed_password_is_refused_once_every_worker_s_login_cache_expires(team_server):
    """Each worker trusts a login it checked for AUTH_CACHE_SECONDS, not longer."""
    import time

    url, password, _artifacts = team_server
    admin = basic_auth("admin", password)
    old, new = f"old-{os.urandom(8).hex()}", f"new-{os.urandom(8).hex()}"
    users = f"{url}/api/2.0/mlflow/users"
    created = {"username": "carol", "password": old}
    assert status_of(f"{users}/create", admin, "POST", created) == 200
    endpoint = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"

    def tries(login: str) -> list[int]:
        """Twelve requests as carol: enough that every worker answers some."""
        return [status_of(endpoint, basic_auth("carol", login)) for _ in range(12)]

    assert tries(old) == [200] * 12  # every worker has checked, and cached, the old login
    changed = time.monotonic()
    update = {"username": "carol", "password": new}
    assert status_of(f"{users}/update-password", admin, "PATCH", update) == 200
    assert tries(new) == [200] * 12
    # The old password gets in only while some worker's cached login lasts; then nowhere.
    while (tried := tries(old)) != [401] * 12:
        assert time.monotonic() - changed < AUTH_CACHE_SECONDS + 15, tried
        time.sleep(0.5)


@pytest.mark.heavy
def test_a_stage_with_wrong_credentials_fails_with_one_line(team_server, tmp_path):
    url, _password, _artifacts = team_server
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(compose_config()))
    env = team_env(team_server, MLFLOW_TRACKING_PASSWORD="not the password")
    result = run([sys.executable, "-m", "mnist_mlops", "train"], tmp_path, env, check=False)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"mnist-mlops train: MLflow at {url} failed")


@pytest.mark.parametrize("password", ["", "password1234", "short"])
def test_the_server_refuses_a_missing_or_weak_admin_password(password, tmp_path):
    env = subprocess_env(MLFLOW_TRACKING_ADMIN_PASSWORD=password)
    command = [
        *(sys.executable, "-m", "mnist_mlops", "tracking-server"),
        *("--backend-store-uri", "postgresql://mlflow:secret@127.0.0.1:9/mlflow"),
    ]
    result = run(command, tmp_path, env, check=False)
    assert result.returncode == 2
    assert "MLFLOW_TRACKING_ADMIN_PASSWORD" in result.stderr


@pytest.fixture(scope="module")
def team_proxy(team_server, certificates):
    """`mnist-mlops proxy tracking` before the team server; yields its https:// URL."""
    url, _password, _artifacts = team_server
    port = free_port()
    command = proxy_command(
        certificates,
        *("tracking", "--tracking-upstream", url.removeprefix("http://")),
        *("--tracking-port", str(port)),
    )
    proxied = f"https://127.0.0.1:{port}"
    context = tls_context(certificates)
    with serving(command, subprocess_env(), proxied, "/health", REPO_ROOT, context=context):
        yield proxied


@pytest.mark.heavy
def test_the_pipeline_reaches_the_server_through_the_https_proxy(
    team_server, team_proxy, team_client, certificates, http_mirror, tmp_path, monkeypatch
):
    project = tiny_clone(tmp_path / "clone")
    env = team_env(
        team_server,
        MLFLOW_TRACKING_URI=team_proxy,
        MLFLOW_TRACKING_SERVER_CERT_PATH=str(certificates / "ca.crt"),
        MNIST_MIRROR=http_mirror,
    )
    run(["dvc", "repro"], project, env)

    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    logged = team_client.get_run(run_id)
    assert logged.info.status == "FINISHED" and "test_accuracy" in logged.data.metrics
    assert len(team_client.get_metric_history(run_id, "loss")) == 1
    # The artifact went up through the proxy and comes back down through it.
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(certificates / "ca.crt"))
    through_proxy = MlflowClient(team_proxy)
    image = through_proxy.download_artifacts(run_id, "confusion_matrix.png", str(tmp_path))
    assert Path(image).read_bytes().startswith(b"\x89PNG")
    # Uploads have their own, larger limit: twice the model server's passes both ways.
    large = tmp_path / "upload" / "large.bin"
    large.parent.mkdir()
    large.write_bytes(os.urandom(20_000_000))
    through_proxy.log_artifact(run_id, str(large))
    back = through_proxy.download_artifacts(run_id, "large.bin", str(tmp_path / "download"))
    assert Path(back).read_bytes() == large.read_bytes()
    (version,) = team_client.search_model_versions(f"run_id = '{run_id}'")
    assert version.name == "mnist-classifier"
    board = run([sys.executable, "-m", "mnist_mlops", "runs"], project, env).stdout
    assert logged.info.run_name in board


def test_the_proxy_keeps_basic_auth_and_plain_http_never_reaches_mlflow(
    team_server, team_proxy, certificates
):
    _url, password, _artifacts = team_server
    endpoint = f"{team_proxy}/api/2.0/mlflow/experiments/search?max_results=1"
    context = tls_context(certificates)
    with pytest.raises(urllib.error.HTTPError) as refused:
        wrong = urllib.request.Request(endpoint, headers=basic_auth("admin", "wrong password"))
        urllib.request.urlopen(wrong, timeout=10, context=context)
    assert refused.value.code == 401
    right = urllib.request.Request(endpoint, headers=basic_auth("admin", password))
    with urllib.request.urlopen(right, timeout=10, context=context) as response:
        assert "experiments" in json.load(response)

    host, port = team_proxy.removeprefix("https://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", endpoint.split(port, 1)[1], headers=basic_auth("admin", password))
    answer = connection.getresponse()
    assert answer.status == 308
    assert answer.getheader("Location").startswith(f"https://{host}:{port}/api/2.0/")
    assert b"experiments" not in answer.read()
    connection.close()


# One evaluator: it judged its candidate against v1 (scored on the same recent
# split), waits for the shared start time, then registers and reconciles.
EVALUATOR = """
import sys, time
from mlflow import MlflowClient
from mnist_mlops.tracking.registry import Gate, Scores, register

name, source, test, recent, start = sys.argv[1:]
champion = MlflowClient().get_model_version(name, "1")
judged_against = (champion, Scores(0.970, 0.850, 200))
time.sleep(max(0.0, float(start) - time.time()))
registration = register(
    source, name, Scores(float(test), float(recent), 200), Gate(), {}, "a racing evaluator",
    champion=judged_against,
)
print(registration.version)
"""


@pytest.mark.heavy
def test_two_evaluators_racing_leave_the_better_version_champion(
    team_server, team_client, tmp_path
):
    import time

    env = team_env(team_server)
    experiment = team_client.get_experiment_by_name("race") or team_client.get_experiment(
        team_client.create_experiment("race")
    )
    holder = team_client.create_run(experiment.experiment_id)
    team_client.log_text(holder.info.run_id, "a stand-in model", "model/MLmodel")
    team_client.set_terminated(holder.info.run_id)
    source = f"runs:/{holder.info.run_id}/model"
    # Both beat v1 on the recent split; the better one there has the lower test accuracy.
    better, worse = ("0.969", "0.960"), ("0.972", "0.930")
    for repetition in range(4):
        name = f"race-{repetition}"
        team_client.create_registered_model(name)
        first = team_client.create_model_version(
            name,
            f"{holder.info.artifact_uri}/model",
            run_id=holder.info.run_id,
            tags={"gate": "passed", "gate.champion": "0", "test_accuracy": "0.97"},
        )
        team_client.set_registered_model_alias(name, "champion", first.version)
        # Even repetitions start the better evaluator first, odd ones the worse.
        order = (better, worse) if repetition % 2 == 0 else (worse, better)
        start = time.time() + 6
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", EVALUATOR, name, source, *scores, str(start + 0.01 * i)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, scores in enumerate(order)
        ]
        outputs = [process.communicate(timeout=120) for process in processes]
        assert [process.returncode for process in processes] == [0, 0], outputs
        version_of = {
            scores: output.strip().splitlines()[-1]
            for scores, (output, _errors) in zip(order, outputs, strict=True)
        }
        champion = team_client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == version_of[better], (repetition, version_of)
        loser = team_client.get_model_version(name, version_of[worse])
        assert loser.tags["gate"] == "passed" and loser.tags["gate.champion"] == "1"
        # The history, on the server's store: v1 as found, then every move, the last
        # one to the champion; nothing was taken for a move by hand.
        # (Both evaluators may find v1 at once: each records it.)
        moves = history.moves(team_client, name)
        found = [move for move in moves if move.why == history.FOUND]
        moved = [move for move in moves if move.why != history.FOUND]
        assert moves[0].why == history.FOUND and {move.to_version for move in found} == {"1"}
        assert moves[-1].to_version == str(champion.version), moves
        assert {move.why for move in moved} <= {history.GATE, history.RECONCILIATION}, moves
        assert {move.to_version for move in moved} <= set(version_of.values())
