"""Faults a shared tracking server brings: down at the start, gone mid-training, abandoned runs."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from mnist_mlops.config import MlflowConfig
from mnist_mlops.tracking.runs import _terminate, fail_abandoned_runs, termination_deferred
from mnist_mlops.tracking.store import use_experiment

from ..conftest import (
    TINY_DATA,
    compose_config,
    copy_project,
    free_port,
    run,
    serving,
    subprocess_env,
    unavailable,
    write_mirror,
)

TINY = (*TINY_DATA, "train.batch_size=32")


def mlflow_server(store, port: int):
    """A real MLflow tracking server (SQLite backend, artifacts proxied) on 127.0.0.1."""
    command = [
        *("mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--backend-store-uri", f"sqlite:///{store / 'server.db'}"),
        *("--artifacts-destination", str(store / "artifacts"), "--serve-artifacts"),
        *("--workers", "1"),
    ]
    env = subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no GenAI job runner
    return serving(command, env, f"http://127.0.0.1:{port}", "/health")


@pytest.mark.heavy
def test_server_down_at_the_start_fails_fast_and_records_nothing(project, http_mirror, tmp_path):
    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*TINY, "train.epochs=1")))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = subprocess_env(MNIST_MIRROR=http_mirror, MLFLOW_TRACKING_URI=url)

    down = run(["dvc", "repro"], project, env, check=False)
    assert down.returncode != 0
    assert f"mnist-mlops train: MLflow at {url} failed" in down.stderr
    assert "Connection refused" in down.stderr
    assert not (project / "models" / "model.keras").exists()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch", "preprocess"}

    with mlflow_server(tmp_path, port):
        back = run(["dvc", "repro"], project, env)
        assert "Running stage 'train'" in back.stdout
        runs = MlflowClient(url).search_runs(
            [MlflowClient(url).get_experiment_by_name("mnist").experiment_id]
        )
    assert [item.info.status for item in runs] == ["FINISHED"]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert runs[0].data.metrics["test_accuracy"] == metrics["test_accuracy"]


@pytest.mark.heavy
def test_server_lost_mid_training_fails_cleanly_and_the_next_run_recovers(
    project, http_mirror, tmp_path
):
    """An outage past mlflow.outage_seconds (3 s here) fails the stage in one line."""
    overrides = (*TINY, "train.epochs=400", "mlflow.outage_seconds=3")
    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*overrides)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = subprocess_env(MNIST_MIRROR=http_mirror, MLFLOW_TRACKING_URI=url)
    run(["dvc", "repro", "preprocess"], project, env)

    with mlflow_server(tmp_path, port) as server_url:
        client = MlflowClient(server_url)
        training = subprocess.Popen(
            [sys.executable, "-m", "mnist_mlops", "train"],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("mnist")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                break
            assert training.poll() is None, training.stderr.read()
            time.sleep(0.3)
        lost_run = runs[0].info.run_id
    # The server is gone now, in the middle of training.
    _stdout, stderr = training.communicate(timeout=120)
    assert training.returncode == 1, stderr
    assert f"mnist-mlops train: MLflow at {url} failed: away for more than 3 s" in stderr
    assert not (project / "models" / "model.keras").exists()
    assert not (project / "models" / "mlflow_run.json").exists()

    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*TINY, "train.epochs=1")))
    with mlflow_server(tmp_path, port):
        recovered = run(["dvc", "repro"], project, env)
        assert "marked FAILED 1 abandoned run(s)" in recovered.stdout
        statuses = {
            item.info.run_id: item.info.status
            for item in client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
        }
    assert statuses.pop(lost_run) == "FAILED"
    assert list(statuses.values()) == ["FINISHED"]


def test_a_run_whose_process_died_is_marked_failed_by_the_next_stage(workdir):
    use_experiment(MlflowConfig())
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("mnist").experiment_id
    host = socket.gethostname()
    orphan = client.create_run(experiment_id, tags={"host": host, "pid": str(dead.pid)})
    alive = client.create_run(experiment_id, tags={"host": host, "pid": str(os.getpid())})

    assert fail_abandoned_runs(experiment_id) == [orphan.info.run_id]
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    client.set_terminated(alive.info.run_id)
    mlflow.end_run()


def test_sigterm_inside_a_store_write_waits_for_the_write_to_finish():
    """A write interrupted half-way could leave SQLite locked for the run's end."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), termination_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now, and must not have raised
            finished.append("write")
        assert finished == ["write"]
        # Outside the block the signal stops the stage at once, as before.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def small_file_system(path: Path, size: str = "48m"):
    """A tmpfs of `size` mounted at `path` (needs root), unmounted afterwards."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        unavailable("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(path: Path) -> Path:
    """Write zeros into `path/filler` until its file system has no space left."""
    filler = path / "filler"
    chunk = bytes(1 << 16)
    with open(filler, "wb") as handle, suppress(OSError):
        while True:
            handle.write(chunk)
            handle.flush()
    return filler


@pytest.mark.heavy
def test_a_full_disk_fails_the_stage_in_one_line_and_registers_nothing(workdir, tmp_path):
    """The artifact store and the DVC cache, each on a small file system that fills up."""
    project = copy_project(tmp_path / "clone")
    write_mirror(tmp_path / "mirror")
    env = subprocess_env(MNIST_MIRROR=str(tmp_path / "mirror"))
    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*TINY, "train.epochs=1")))
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    with (
        small_file_system(project / "mlartifacts") as artifacts,
        small_file_system(project / ".dvc" / "cache") as cache,
    ):
        run(["dvc", "repro"], project, env)
        lock = (project / "dvc.lock").read_text()
        (project / "params.yaml").write_text(
            yaml.safe_dump(compose_config(*TINY, "train.epochs=1", "train.seed=7"))
        )

        # DVC's cache is full when train's outputs are to be cached.
        filler = fill(cache)
        failed = run(["dvc", "repro", "train"], project, env, check=False)
        assert failed.returncode != 0
        assert "No space left on device" in failed.stderr, failed.stderr
        assert (project / "dvc.lock").read_text() == lock
        filler.unlink()
        run(["dvc", "repro", "train"], project, env)
        trained = (project / "dvc.lock").read_text()

        # The artifact store is full when evaluate logs and registers the model.
        filler = fill(artifacts)
        failed = run(["dvc", "repro"], project, env, check=False)
        assert failed.returncode != 0
        (line,) = [line for line in failed.stderr.splitlines() if "mnist-mlops" in line]
        assert line == (
            f"mnist-mlops evaluate: no space left: MLflow's artifact store {artifacts} is full "
            "(No space left on device)"
        )
        assert "Traceback" not in failed.stderr
        versions = client.search_model_versions("name='mnist-classifier'")
        assert [str(version.version) for version in versions] == ["1"]
        assert str(client.get_model_version_by_alias("mnist-classifier", "champion").version) == "1"
        assert (project / "dvc.lock").read_text() == trained
        assert "evaluate" in run(["dvc", "status"], project, env).stdout

        filler.unlink()
        run(["dvc", "repro"], project, env)
        versions = client.search_model_versions("name='mnist-classifier'")
        assert sorted(str(version.version) for version in versions) == ["1", "2"]
        for version in versions:  # every version's files are whole
            files = mlflow.artifacts.download_artifacts(
                client.get_model_version_download_uri("mnist-classifier", version.version),
                dst_path=str(tmp_path / f"v{version.version}"),
            )
            assert (Path(files) / "MLmodel").exists()
        assert run(["dvc", "status"], project, env).stdout.strip() == (
            "Data and pipelines are up to date."
        )
