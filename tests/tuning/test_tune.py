"""`mnist-mlops tune`: Optuna studies shared by worker processes, on SQLite and PostgreSQL.

Real components throughout: the workers are `mnist-mlops tune` processes on a
project whose data/processed came from `dvc repro preprocess` on tiny MNIST,
the storages are Optuna's RDBStorage on SQLite and on the private PostgreSQL
cluster of the team tests, and MLflow is the project's embedded store.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from mnist_mlops.config import flatten
from mnist_mlops.team.server import TeamServerError, optuna_database_uri, prepare_postgres
from mnist_mlops.tuning import search

from ..conftest import (
    REPO_ROOT,
    TINY_DATA,
    compose_config,
    copy_project,
    free_port,
    run,
    serving,
    subprocess_env,
    write_mirror,
)

TINY = TINY_DATA
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# Short trials on tiny data: 5 or 6 epochs of the mlp search space.
SHORT = ("--heartbeat", "1", "search.train.epochs.high=6")
# A space with a region that cannot learn: SGD at a learning rate of 1000 diverges.
BAD_REGION = """\
model:
  name: mlp
  hidden_units: 32
optimizer:
  name: sgd
  learning_rate: {distribution: categorical, choices: [0.05, 1000.0]}
train:
  batch_size: 32
  epochs: 6
"""


@pytest.fixture(scope="module")
def tuning(tmp_path_factory):
    """A project clone whose tiny data/processed `dvc repro preprocess` made; (path, env)."""
    base = tmp_path_factory.mktemp("tune")
    project = copy_project(base / "clone")
    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*TINY)))
    (project / "conf" / "search" / "bad_region.yaml").write_text(BAD_REGION)
    write_mirror(base / "mirror")
    env = subprocess_env(MNIST_MIRROR=str(base / "mirror"), PYTHONUNBUFFERED="1")
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "tiny data"], project, env)
    run(["dvc", "repro", "preprocess"], project, env)
    return project, env


def tune_command(study: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "mnist_mlops", "tune", "--study", study, *arguments]


def start_workers(project, env, count: int, study: str, *arguments: str) -> list:
    return [
        subprocess.Popen(
            tune_command(study, *arguments),
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]


def finish(workers, timeout: float = 600) -> list[str]:
    outputs = []
    for worker in workers:
        output, _ = worker.communicate(timeout=timeout)
        assert worker.returncode == 0, output
        outputs.append(output)
    return outputs


def embedded_storage(project) -> str:
    return f"sqlite:///{project / 'optuna.db'}"


def load(storage: str, study: str) -> optuna.Study:
    if storage.startswith("postgresql://"):
        storage = storage.replace("postgresql://", "postgresql+psycopg2://", 1)
    return optuna.load_study(study_name=study, storage=storage)


def mlflow_runs(project, study: str) -> tuple[MlflowClient, list, list]:
    """The study's parent runs and trial runs in the project's store."""
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`optuna.study` = '{study}'"
    )
    parents = [r for r in runs if r.data.tags["optuna.role"] == "study"]
    children = [r for r in runs if r.data.tags["optuna.role"] == "trial"]
    return client, parents, children


def assert_complete_study(project, storage: str, study: str, budget: int) -> optuna.Study:
    """Exactly `budget` finished trials, none left running, one parent with every child."""
    loaded = load(storage, study)
    states = [trial.state for trial in loaded.trials]
    assert sum(state in FINISHED for state in states) == budget, states
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.WAITING not in states
    _client, parents, children = mlflow_runs(project, study)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert loaded.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    finished_runs = [r for r in children if r.data.tags["optuna.state"] in ("COMPLETE", "PRUNED")]
    assert len(finished_runs) == budget
    assert all(r.info.status == "FINISHED" for r in finished_runs)
    assert not [r for r in children if r.info.status == "RUNNING"]
    by_run = {t.user_attrs.get("mlflow_run_id"): t for t in loaded.trials}
    for child in finished_runs:
        trial = by_run[child.info.run_id]
        assert child.data.tags["optuna.trial_number"] == str(trial.number)
        assert child.data.tags["optuna.state"] == trial.state.name
        assert len(child.data.metrics) >= 4  # per-epoch loss, accuracy and their val_ twins
    return loaded


@pytest.fixture(scope="module")
def duo(tuning):
    """Two workers' 6-trial study `duo` on the embedded storage; yields their outputs."""
    project, env = tuning
    return finish(start_workers(project, env, 2, "duo", "--trials", "6", *SHORT))


@pytest.mark.heavy
def test_two_workers_share_one_study_and_nest_every_trial_under_one_parent(tuning, duo):
    project, env = tuning
    outputs = duo
    study = assert_complete_study(project, embedded_storage(project), "duo", 6)
    workers = {trial.user_attrs["worker"] for trial in study.trials if trial.state in FINISHED}
    assert len(workers) == 2, outputs  # both processes ran trials

    client, (parent,), children = mlflow_runs(project, "duo")
    # Trials log the pipeline's own param names, so they compare with pipeline runs.
    for child in children:
        optimizer = child.data.params["optimizer.name"]
        assert set(child.data.params) == set(flatten(compose_config(f"optimizer={optimizer}")))
    best = study.best_trial
    assert parent.data.tags["optuna.best_trial"] == str(best.number)
    assert parent.data.params["optuna.search"] == "mlp"
    assert "TPESampler(seed=42" in parent.data.params["optuna.sampler"]
    assert parent.data.params["optuna.pruner"].startswith("MedianPruner(")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "search_space.yaml"} <= artifacts
    best_file = client.download_artifacts(parent.info.run_id, "best_trial.json")
    assert json.loads(Path(best_file).read_text())["params"] == best.params
    # Trials register no models.
    assert not client.search_registered_models()

    leaderboard = run([sys.executable, "-m", "mnist_mlops", "runs", "--study", "duo"], project, env)
    lines = leaderboard.stdout.strip().splitlines()
    assert len(lines) == 1 + 6 and lines[1].startswith("duo-")
    assert f" {best.value:.4f} " in lines[1]  # best first (trials may tie)


@pytest.mark.heavy
def test_the_best_trial_becomes_a_preset_that_dvc_exp_run_reproduces(tuning, duo):
    project, env = tuning
    study = load(embedded_storage(project), "duo")
    best = study.best_trial
    preset = yaml.safe_load((project / "conf" / "experiment" / "duo.yaml").read_text())
    default = flatten(compose_config())
    exported = flatten({k: v for k, v in preset.items() if k != "defaults"})
    assert exported and all(default[key] != value for key, value in exported.items())

    result = run(
        ["dvc", "exp", "run", "-S", "experiment=duo", *(f"-S{item}" for item in TINY)],
        project,
        env,
    )
    assert "Running stage 'train'" in result.stdout
    assert "Running stage 'evaluate'" in result.stdout
    params = flatten(yaml.safe_load((project / "params.yaml").read_text()))
    for key, value in best.params.items():
        assert params[key] == value, key
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert "test_accuracy" in metrics
    registry = json.loads((project / "reports" / "registry.json").read_text())
    assert registry["version"] >= 1
    # The same config, seed and data give the same network: within one of 20 images.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    pipeline_run = client.get_run(pipeline_run_id(project))
    assert abs(pipeline_run.data.metrics["val_accuracy"] - best.value) <= 0.05


@pytest.mark.heavy
def test_export_writes_the_preset_again_and_never_over_a_hand_written_one(tuning, duo):
    project, env = tuning
    preset = project / "conf" / "experiment" / "duo.yaml"
    exported = preset.read_text()
    trials = len(load(embedded_storage(project), "duo").trials)
    preset.unlink()
    result = run(tune_command("duo", "--export"), project, env)
    assert "dvc exp run -S experiment=duo" in result.stdout
    assert preset.read_text() == exported
    assert len(load(embedded_storage(project), "duo").trials) == trials  # nothing ran

    preset.write_text("# @package _global_\ntrain:\n  epochs: 7\n")
    refused = run(tune_command("duo", "--export"), project, env, check=False)
    assert refused.returncode == 2 and "was not exported by tune" in refused.stderr
    assert preset.read_text().endswith("epochs: 7\n")
    preset.write_text(exported)


def test_every_search_space_is_valid_and_covers_its_groups():
    conf = REPO_ROOT / "conf"
    assert search.available(conf) == ["cnn", "mlp"]
    for name in search.available(conf):
        space = search.load(name, config_dir=conf)
        assert space.parameters
        for parameter in space.parameters:
            assert parameter.name.split(".")[0] in ("model", "optimizer", "train")


@pytest.mark.heavy
def test_workers_on_postgresql_share_one_study_through_a_database_restart(tuning, postgres):
    """On the database `mnist-mlops tracking-server` prepares; PostgreSQL restarts mid-study."""
    project, env = tuning
    admin_uri, port = postgres
    backend = f"postgresql://mlflow_tune:{secrets.token_hex(8)}@127.0.0.1:{port}/tune"
    prepare_postgres(admin_uri, backend)
    # The role exists now and keeps its password: another one is refused in one line.
    with pytest.raises(
        TeamServerError, match="refuses the backend store URI's login as 'mlflow_tune'"
    ):
        prepare_postgres(admin_uri, backend.replace("mlflow_tune:", "mlflow_tune:x"))
    storage = optuna_database_uri(backend)
    assert storage.endswith("/tune_optuna")
    workers = start_workers(project, env, 2, "team", "--trials", "6", "--storage", storage, *SHORT)

    def running() -> bool:
        trials = load(storage, "team").trials if "team" in study_names(storage) else []
        done = [trial for trial in trials if trial.state in FINISHED]
        return len(done) >= 1 and any(t.state.name == "RUNNING" for t in trials)

    deadline = time.monotonic() + 300
    while not running():
        assert all(worker.poll() is None for worker in workers), finish(workers)
        assert time.monotonic() < deadline
        time.sleep(0.5)
    postgres.stop()
    # Longer than the grace period (3 heartbeats of 1 s): every heartbeat is old after it.
    time.sleep(8)
    postgres.start()
    outputs = finish(workers)
    assert_complete_study(project, storage, "team", 6)
    assert all("the Optuna storage is back" in output for output in outputs), outputs
    assert "stopped beating" not in "".join(outputs)


def study_names(storage: str) -> list[str]:
    if storage.startswith("postgresql://"):
        storage = storage.replace("postgresql://", "postgresql+psycopg2://", 1)
    return [summary.study_name for summary in optuna.get_all_study_summaries(storage)]


@pytest.mark.heavy
def test_a_killed_worker_s_trial_fails_and_its_params_are_retried(tuning):
    project, env = tuning
    storage = embedded_storage(project)
    # Longer trials, no pruning, and a stale trial found after 2 s without a heartbeat.
    arguments = ("--trials", "6", "--pruner", "none", "--heartbeat", "1", "--grace-period", "2")
    arguments += ("search.train.epochs.low=25", "search.train.epochs.high=30")
    victim, survivor = start_workers(project, env, 2, "crash", *arguments)
    deadline = time.monotonic() + 300
    killed = None
    while killed is None:
        assert time.monotonic() < deadline, "no trial of the first worker got under way"
        time.sleep(0.2)
        try:
            trials = load(storage, "crash").trials
        except KeyError:  # not created yet
            continue
        for trial in trials:
            mine = trial.user_attrs.get("worker", "").endswith(f":{victim.pid}")
            if mine and trial.state.name == "RUNNING" and trial.intermediate_values:
                victim.kill()
                victim.wait()
                killed = trial
    restarted = start_workers(project, env, 1, "crash", *arguments)
    finish([survivor, *restarted])

    study = assert_complete_study(project, storage, "crash", 6)
    failed = study.trials[killed.number]
    assert failed.state.name == "FAIL"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state in FINISHED
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    killed_run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "FAILED"
    assert killed_run.data.tags["optuna.state"] == "FAIL"


@pytest.mark.heavy
def test_sigterm_fails_the_trial_kills_its_run_and_the_same_command_resumes(tuning):
    project, env = tuning
    storage = embedded_storage(project)
    arguments = ("--trials", "3", "--pruner", "none", "--heartbeat", "1")
    arguments += ("search.train.epochs.low=25", "search.train.epochs.high=30")
    (worker,) = start_workers(project, env, 1, "stop", *arguments)
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, "no trial got under way"
        time.sleep(0.2)
        try:
            trials = load(storage, "stop").trials
        except KeyError:
            continue
        running = [t for t in trials if t.state.name == "RUNNING" and t.intermediate_values]
        if running:
            break
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 130, output
    assert "the same command resumes the study" in output
    stopped = load(storage, "stop").trials[running[0].number]
    assert stopped.state.name == "FAIL"
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_run(stopped.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    finished_before = sum(t.state in FINISHED for t in load(storage, "stop").trials)

    finish(start_workers(project, env, 1, "stop", *arguments))
    study = assert_complete_study(project, storage, "stop", 3)
    assert finished_before < 3
    assert len(study.trials) == 3 + 1  # the stopped trial, then exactly the rest of the budget


@pytest.mark.heavy
def test_a_bad_region_is_pruned(tuning):
    project, env = tuning
    # Six random trials (seed 2 draws the good rate first); pruning from the second on.
    arguments = ("--trials", "6", "--search", "bad_region", "--startup-trials", "6")
    arguments += ("--prune-after", "1", "--seed", "2")
    finish(start_workers(project, env, 1, "prune", *arguments))
    study = assert_complete_study(project, embedded_storage(project), "prune", 6)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned
    assert all(t.params["optimizer.learning_rate"] == 1000.0 for t in pruned)
    assert all(t.user_attrs["epochs_run"] < 6 for t in pruned)
    _client, _parents, children = mlflow_runs(project, "prune")
    assert sum(r.data.tags["optuna.state"] == "PRUNED" for r in children) == len(pruned)


BAD_SPACES = {
    "search.train.epoch=5": "unknown parameter train.epoch",
    "search.train.epochs.low=20": "empty range, low (20) must be below high (15)",
    "search.model.hidden_units.distribution=normal": "unknown distribution 'normal'",
    "search.optimizer.name.choices=[adamw]": "unknown optimizer 'adamw'",
}


@pytest.mark.parametrize("override", sorted(BAD_SPACES))
def test_a_bad_search_space_stops_with_one_line_before_tensorflow_loads(tuning, override):
    project, env = tuning
    override = f"+{override}" if override == "search.train.epoch=5" else override
    check = (
        "import sys; from mnist_mlops.__main__ import main; "
        f"code = main(['tune', '--study', 'bad', {override!r}]); "
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; sys.exit(code)"
    )
    result = run([sys.executable, "-c", check], project, env, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist-mlops tune: search mlp: "), lines
    assert BAD_SPACES[override.lstrip("+")] in lines[0]


def test_a_storage_that_is_down_or_refuses_the_password_fails_with_one_line(tuning, postgres):
    project, env = tuning
    admin_uri, _port = postgres
    down = f"postgresql://optuna:secret-password@127.0.0.1:{free_port()}/optuna"
    wrong = admin_uri.replace("postgres:", "postgres:wrong", 1).rsplit("/", 1)[0] + "/optuna"
    for storage, reason in ((down, "Connection refused"), (wrong, "password authentication")):
        started = time.monotonic()
        result = run([*tune_command("down"), "--storage", storage], project, env, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("mnist-mlops tune: cannot use the Optuna storage postgresql")
        assert reason in lines[0] and "***" in lines[0]
        assert "secret-password" not in lines[0] and "wrong" not in lines[0]
        assert time.monotonic() - started < 60


def test_missing_processed_data_names_the_command_that_makes_it(tmp_path):
    project = copy_project(tmp_path / "clone")
    result = run(tune_command("early"), project, subprocess_env(), check=False)
    assert result.returncode == 2
    assert "dvc repro preprocess" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (project / "optuna.db").exists()


@pytest.mark.heavy
def test_optuna_dashboard_shows_the_study_from_the_same_storage(tuning, duo):
    project, env = tuning
    port = free_port()
    dashboard = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
    command = [dashboard, embedded_storage(project), "--host", "127.0.0.1", "--port", str(port)]
    address = f"http://127.0.0.1:{port}"
    with serving(command, env, address, "/api/studies", cwd=project) as url:
        summaries = get_json(f"{url}/api/studies")["study_summaries"]
        (summary,) = [study for study in summaries if study["study_name"] == "duo"]
        detail = get_json(f"{url}/api/studies/{summary['study_id']}")
    states = [trial["state"] for trial in detail["trials"]]
    assert sum(state in ("Complete", "Pruned") for state in states) == 6, states


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def pipeline_run_id(project) -> str:
    return json.loads((project / "models" / "mlflow_run.json").read_text())["run_id"]


def test_a_trial_another_worker_failed_as_stale_does_not_stop_this_worker():
    """After a storage outage another worker may fail this worker's trial as stale (its
    heartbeat missed); Optuna then refuses the result. The worker goes on with the next."""
    from mnist_mlops.tuning.tune import work

    study = optuna.create_study(direction="maximize")

    class Objective:
        calls = 0

        def __call__(self, trial):
            self.calls += 1
            if self.calls == 1:
                # What the other worker's fail_stale_trials does, while this trial's
                # own MLflow or storage request fails.
                failed = optuna.trial.TrialState.FAIL
                study._storage.set_trial_state_values(trial._trial_id, failed)
                raise ConnectionError("the storage went away")
            return 0.5

        def report(self, _study, _trial):
            pass

    objective = Objective()
    work(study, budget=2, timeout=60, objective=objective, poll_seconds=0.01)
    states = [trial.state.name for trial in study.trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"], states
