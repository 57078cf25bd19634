"""A fit rides out a restart of the team's tracking server, and of the PostgreSQL behind it.

The outages are real: the server process is stopped and started again on the
same port, and the PostgreSQL cluster is stopped (`pg_ctl stop -m fast`) and
started. Today's clean failure past the bound is tests/tracking/test_faults.py.
"""

import json
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from ..conftest import (
    TINY_DATA,
    client_env,
    compose_config,
    copy_project,
    free_port,
    run,
    serving,
    tracking_server,
)

TINY = (*TINY_DATA, "train.batch_size=32")
# Long enough for the fit to log through it: a retry a second, more than ten epochs.
OUTAGE_SECONDS = 6
# Enough epochs of the tiny data for both outages to fall inside the fit: the second
# ends about 2 outages, a server start and 5 epochs after the first epoch (15 to 30 s
# here), and 300 epochs take about 50 s on an idle machine, 100 under the suite's load.
EPOCHS = 300


def wait_for(condition, process: subprocess.Popen, log, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"the stage ended early:\n{log.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)
    return found


def logged_between(history, start: float, end: float) -> list:
    """Entries of a metric history whose client-side timestamps fall inside (start, end)."""
    return [entry for entry in history if start * 1000 < entry.timestamp < end * 1000]


@pytest.mark.heavy
def test_a_fit_rides_out_a_tracking_server_restart_and_a_postgres_restart(
    postgres, http_mirror, tmp_path, monkeypatch
):
    project = copy_project(tmp_path / "clone")
    (project / "params.yaml").write_text(
        yaml.safe_dump(compose_config(*TINY, f"train.epochs={EPOCHS}"))
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, server_env, password = tracking_server(
        postgres, "mlflow_outage", str(tmp_path / "artifacts"), port
    )
    env = client_env(url, password, MNIST_MIRROR=http_mirror)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(url)

    with open(tmp_path / "repro.log", "w+") as log:
        with serving(server, server_env, url, "/health"):
            run(["dvc", "repro", "preprocess"], project, env)
            repro = subprocess.Popen(
                ["dvc", "repro"], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT
            )

            def first_epoch():
                experiment = client.get_experiment_by_name("mnist")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                return runs and client.get_metric_history(runs[0].info.run_id, "loss") and runs[0]

            run_id = wait_for(first_epoch, repro, log).info.run_id
        server_away = time.time()
        time.sleep(OUTAGE_SECONDS)
        with serving(server, server_env, url, "/health"):
            server_away = (server_away, time.time())
            before = len(client.get_metric_history(run_id, "loss"))
            wait_for(
                lambda: len(client.get_metric_history(run_id, "loss")) > before + 5, repro, log
            )
            postgres.stop()
            database_away = time.time()
            time.sleep(OUTAGE_SECONDS)
            postgres.start()
            database_away = (database_away, time.time())
            assert repro.wait(timeout=600) == 0
            log.seek(0)
            output = log.read()
            logged = client.get_run(run_id)
            loss = client.get_metric_history(run_id, "loss")
            cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
            others = [
                len(client.get_metric_history(run_id, name))
                for name in ("accuracy", "val_loss", "val_accuracy")
            ]
            champion = client.get_model_version_by_alias("mnist-classifier", "champion")
        # The champion's history is in the server's store: the same after another restart.
        with serving(server, server_env, url, "/health"):
            command = [sys.executable, "-m", "mnist_mlops", "registry", "history", "--json"]
            moves = [json.loads(line) for line in run(command, project, env).stdout.splitlines()]

    assert logged.info.status == "FINISHED"
    assert output.count("MLflow is away") == 2 and output.count("MLflow is back") == 2, output
    # Every epoch exactly once, in order; the same for the machine's samples.
    assert [entry.step for entry in loss] == list(range(EPOCHS))
    assert others == [EPOCHS] * 3
    assert [entry.step for entry in cpu] == list(range(len(cpu)))
    # The fit went on through both outages: what it logged meanwhile arrived later.
    for start, end in (server_away, database_away):
        assert logged_between(loss, start + 1, end - 1), (start, end)
        assert logged_between(cpu, start + 1, end - 1), (start, end)
    assert logged.data.metrics["fit_seconds"] > 2 * OUTAGE_SECONDS
    assert champion.run_id == run_id
    assert [(move["from_version"], move["to_version"], move["why"]) for move in moves] == [
        ("", str(champion.version), "gate")
    ]
    assert "test_accuracy" in logged.data.metrics
