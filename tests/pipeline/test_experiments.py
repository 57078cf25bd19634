"""Experiments: a queued grid run two at a time, compared in DVC, MLflow and the leaderboard."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ..conftest import (
    TINY_DATA,
    compose_config,
    copy_project,
    free_port,
    kill_processes_in,
    run,
    serving,
    subprocess_env,
    write_mirror,
)

TINY = (*TINY_DATA, "train.batch_size=32")
GRID = 4


# `.venv/bin/dvc`, run as the README shows it: from a shell where nothing is
# activated and whose PATH has no Python with the project's packages.
VENV_DVC = str(Path(sys.executable).parent / "dvc")


def not_activated(env: dict) -> dict:
    """`env` with a PATH of the system's folders alone: no .venv, no project Python."""
    return {**env, "PATH": "/usr/bin:/bin"}


def start_queue(project, env, jobs: int) -> None:
    """`dvc queue start`, which returns once its workers are spawned.

    Each worker is spawned through a forked helper that keeps the caller's
    stdout and stderr open until the worker exits, so this must not capture
    them: with pipes, waiting for the command would wait for the whole queue.
    """
    with open(project.parent / "queue-start.log", "w") as log:
        subprocess.run(
            [VENV_DVC, "queue", "start", "-j", str(jobs)],
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=True,
        )


def queue_report(project, env, status: str) -> str:
    """The queue's status and the log of every task that did not succeed."""
    report = [status]
    for line in status.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2 and fields[-1] != "Success" and not line.startswith("Worker"):
            logs = run(["dvc", "queue", "logs", fields[0]], project, env, check=False, timeout=60)
            report.append(f"--- {fields[1]} ---\n{logs.stdout}{logs.stderr}")
    return "\n".join(report)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A fresh clone that ran `dvc exp run --queue` over a 2×2 grid with `dvc queue start -j 2`."""
    base = tmp_path_factory.mktemp("grid")
    mirror = base / "mirror"
    write_mirror(mirror)
    project = copy_project(base / "clone")
    env = subprocess_env(MNIST_MIRROR=str(mirror))

    overrides = [f"-S{override}" for override in (*TINY, "train.epochs=1")]
    grid_overrides = ["-Smodel=mlp,cnn", "-Soptimizer=rmsprop,adam"]
    bare = not_activated(env)
    # As docs/configuration.md says: the data first, committed, so that two workers never
    # run the same stage at the same moment (DVC's run cache races there).
    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*TINY, "train.epochs=1")))
    run([VENV_DVC, "repro", "preprocess"], project, bare)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "the data"], project, env)
    run([VENV_DVC, "exp", "run", "--queue", *overrides, *grid_overrides], project, bare)
    start_queue(project, bare, jobs=2)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = run(["dvc", "queue", "status"], project, env, timeout=120).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(3)
        else:
            pytest.fail(f"the queue did not finish in 900 s:\n{queue_report(project, env, status)}")
        assert status.count("Success") == GRID, queue_report(project, env, status)
        # Each worker took the committed data and ran only what the grid changes.
        for task in [line.split()[0] for line in status.splitlines() if "Success" in line]:
            logs = run(["dvc", "queue", "logs", task], project, env, timeout=60).stdout
            assert "Running stage 'train'" in logs and "Running stage 'fetch'" not in logs, logs
        yield project, env
    finally:
        # Idle workers leave on their own after 10 s; never leave one behind.
        run(["dvc", "queue", "stop", "--kill"], project, env, check=False, timeout=120)
        kill_processes_in(project)


@pytest.mark.heavy
def test_an_experiment_in_a_temporary_copy_needs_nothing_activated(tmp_path):
    """`.venv/bin/dvc exp run --temp`, no virtualenv on PATH: the stages find the project's
    Python; a failed experiment leaves params.yaml and the outputs as they were."""
    mirror = tmp_path / "mirror"
    write_mirror(mirror)
    project = copy_project(tmp_path / "clone")
    env = not_activated(subprocess_env(MNIST_MIRROR=str(mirror)))
    overrides = [f"-S{override}" for override in (*TINY, "train.epochs=1")]
    params = (project / "params.yaml").read_text()
    done = run([VENV_DVC, "exp", "run", "--temp", *overrides, "-n", "bare"], project, env)
    assert "No module named" not in done.stderr
    assert (project / "params.yaml").read_text() == params
    listed = run([VENV_DVC, "exp", "show", "--no-pager", "--csv"], project, env).stdout
    assert "bare" in listed
    failed = run(
        [VENV_DVC, "exp", "run", "--temp", *overrides, "-Strain.epochs=0"],
        project,
        env,
        check=False,
    )
    assert failed.returncode != 0 and "epochs" in failed.stderr
    assert (project / "params.yaml").read_text() == params
    assert run(["git", "status", "--porcelain"], project, env).stdout == ""


@pytest.mark.heavy
def test_every_queued_experiment_lands_in_the_one_store(grid):
    project, _env = grid
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert len(runs) == GRID
    assert {run.info.status for run in runs} == {"FINISHED"}
    combinations = {
        (run.data.params["model.name"], run.data.params["optimizer.name"]) for run in runs
    }
    assert combinations == {
        ("mlp", "rmsprop"),
        ("mlp", "adam"),
        ("cnn", "rmsprop"),
        ("cnn", "adam"),
    }
    versions = client.search_model_versions("name = 'mnist-classifier'")
    assert sorted(int(version.version) for version in versions) == list(range(1, GRID + 1))
    champion = client.get_model_version_by_alias("mnist-classifier", "champion")
    best = max(float(version.tags["test_accuracy"]) for version in versions)
    assert float(champion.tags["test_accuracy"]) == best
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert {run.data.tags["dvc.baseline_rev"] for run in runs} == {head}
    # No run was written to a temporary copy's own store.
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))


@pytest.mark.heavy
def test_dvc_experiments_and_mlflow_runs_lead_to_each_other(grid):
    project, env = grid
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project, env).stdout)
    experiments = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            revision = experiment["revs"][0]
            metrics = revision["data"]["metrics"]
            experiments[experiment["name"]] = {
                "registry": metrics["reports/registry.json"]["data"],
                "metrics": metrics["reports/metrics.json"]["data"],
            }
    assert len(experiments) == GRID
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    for name, outputs in experiments.items():
        logged = client.get_run(outputs["registry"]["run_id"])
        assert logged.data.tags["dvc.exp_name"] == name
        assert logged.info.run_name == name
        assert logged.data.metrics["test_accuracy"] == pytest.approx(
            outputs["metrics"]["test_accuracy"]
        )
        version = client.get_model_version("mnist-classifier", str(outputs["registry"]["version"]))
        assert version.tags["run_id"] == logged.info.run_id
        assert version.tags["dvc.exp_name"] == name
    table = run(["dvc", "exp", "show", "--no-pager", "--md"], project, env).stdout
    assert "test_accuracy" in table and "version" in table


def leaderboard(project, env, *arguments):
    result = run([sys.executable, "-m", "mnist_mlops", "runs", *arguments], project, env)
    header, *lines = result.stdout.strip().splitlines()
    return header, lines


@pytest.mark.heavy
def test_leaderboard_lists_runs_best_first_and_marks_the_champion(grid):
    project, env = grid
    header, lines = leaderboard(project, env)
    for column in ("run name", "DVC experiment", "model", "optimizer", "epochs", "val acc"):
        assert column in header
    assert len(lines) == GRID
    accuracies = [float(line.split()[6]) for line in lines]
    assert accuracies == sorted(accuracies, reverse=True)
    assert [line.rstrip().endswith("*") for line in lines].count(True) == 1

    _header, cnn_only = leaderboard(project, env, "--filter", "params.model.name = 'cnn'")
    assert len(cnn_only) == 2 and all(" cnn " in line for line in cnn_only)
    _header, top = leaderboard(project, env, "--top", "1")
    assert [line.split() for line in top] == [lines[0].split()]


@pytest.fixture(scope="module")
def ui_server(grid):
    """The real MLflow UI on the grid's store, as the README starts it (`make ui`)."""
    project, env = grid
    port = free_port()
    command = [sys.executable, "-m", "mnist_mlops", "ui", "--port", str(port)]
    with serving(command, env, f"http://127.0.0.1:{port}", "/health", project) as url:
        yield url


def rest(url: str, path: str, body: dict | None = None) -> dict:
    if body is None:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}")
    else:
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.mark.heavy
def test_mlflow_ui_shows_the_runs_metrics_and_registered_model(ui_server):
    experiment = rest(ui_server, "experiments/get-by-name?experiment_name=mnist")["experiment"]
    found = rest(ui_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})
    assert len(found["runs"]) == GRID
    first = found["runs"][0]
    run_id = first["info"]["run_id"]
    metric_names = {metric["key"] for metric in first["data"]["metrics"]}
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "test_accuracy"} <= metric_names
    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": "val_accuracy"})
    history = rest(ui_server, f"metrics/get-history?{query}")
    assert len(history["metrics"]) == 1
    model = rest(ui_server, "registered-models/get?name=mnist-classifier")["registered_model"]
    assert [alias["alias"] for alias in model.get("aliases", [])].count("champion") == 1


@pytest.mark.heavy
def test_leaderboard_reads_a_tracking_server_too(grid, ui_server):
    project, env = grid
    _header, local = leaderboard(project, env)
    _header, remote = leaderboard(project, {**env, "MLFLOW_TRACKING_URI": ui_server})
    assert [line.split() for line in remote] == [line.split() for line in local]


def test_a_training_run_says_which_keys_params_yaml_changed(tmp_path):
    """After `dvc exp apply` (here: params.yaml edited as it would), `make repro` says so."""
    project = copy_project(tmp_path / "clone")
    env = subprocess_env()
    check = [sys.executable, "-m", "mnist_mlops.pipeline.params_check", "make repro"]
    assert run(check, project, env).stderr == ""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["optimizer"] = {"name": "adam", "learning_rate": 0.001}
    params["train"]["epochs"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (line,) = run(check, project, env).stderr.strip().splitlines()
    assert line.startswith("make repro: params.yaml differs from what conf/ composes: ")
    assert "optimizer.name adam (conf/: rmsprop)" in line and "train.epochs 3 (conf/: 5)" in line
    assert "`make params` goes back to conf/" in line
