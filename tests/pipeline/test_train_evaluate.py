"""Stages train and evaluate against a real MLflow store (SQLite in tmp_path)."""

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mnist_mlops.config import MlflowConfig
from mnist_mlops.paths import METRICS_FILE, MODEL_FILE, PREDICTIONS_FILE, RUN_FILE
from mnist_mlops.pipeline.evaluate import evaluate
from mnist_mlops.pipeline.fetch import fetch
from mnist_mlops.pipeline.preprocess import load_split, preprocess
from mnist_mlops.pipeline.train import EPOCH_METRICS, train
from mnist_mlops.tracking.datasets import dvc_md5
from mnist_mlops.tracking.runs import active_run, log_dataset
from mnist_mlops.tracking.store import tracking_uri, use_experiment

from ..conftest import REPO_ROOT, compose_config, run, subprocess_env, tiny_overrides


@pytest.fixture
def prepared(workdir, config):
    """A project folder with fetched and preprocessed tiny data."""
    fetch(config.data)
    manifest = preprocess(config)
    return config, manifest


def only_run(experiment_name: str = "mnist"):
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one run, found {len(runs)}"
    return client, runs[0]


def test_train_and_evaluate_record_one_complete_run(prepared, workdir):
    config, manifest = prepared
    final = train(config)
    metrics = evaluate(config)

    client, logged = only_run()
    run_id = logged.info.run_id
    assert logged.info.status == "FINISHED"
    assert json.loads(RUN_FILE.read_text())["run_id"] == run_id

    # Every resolved config value is a parameter, under its dotted key.
    assert logged.data.params == {key: str(value) for key, value in config.flat_params().items()}
    assert logged.data.params["model.name"] == "mlp"
    assert logged.data.params["train.epochs"] == "2"

    for name in EPOCH_METRICS:
        history = client.get_metric_history(run_id, name)
        assert [point.step for point in history] == [0, 1]
        assert history[-1].value == pytest.approx(final[name])

    assert logged.data.tags["data.digest"] == manifest["digest"]
    # The data it trained on, by DVC's hashes; the Keras model is an artifact, not a LoggedModel.
    inputs = {found.dataset.name: found.dataset for found in logged.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-raw", "mnist-train", "mnist-validation", "mnist-test"}
    assert inputs["mnist-train"].digest == dvc_md5(workdir / "data/processed/train.npz")
    assert json.loads(inputs["mnist-raw"].source)["path"] == "data/raw"
    assert logged.data.tags["data.dvc.processed"] == dvc_md5(workdir / "data/processed")
    (served,) = mlflow.search_logged_models(
        experiment_ids=[logged.info.experiment_id], output_format="list"
    )
    assert served.name == "classifier" and served.source_run_id == run_id
    # Its metrics are the evaluation's, each with the split it was measured on; none of the
    # epochs' but the last, and no system metric.
    measured_on = {metric.key: metric.dataset_name for metric in served.metrics}
    assert measured_on["test_accuracy"] == measured_on["test_accuracy_digit_7"] == "mnist-test"
    assert measured_on["val_accuracy"] == "mnist-validation"
    assert not [key for key in measured_on if key.startswith("system/") or key == "accuracy"]
    test_digest = {m.dataset_digest for m in served.metrics if m.dataset_name == "mnist-test"}
    assert test_digest == {dvc_md5(workdir / "data/processed/test.npz")}
    assert (
        mlflow.pyfunc.load_model(f"models:/{served.model_id}").metadata.model_id == served.model_id
    )
    assert logged.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert json.loads(METRICS_FILE.read_text()) == metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {"confusion_matrix.png", "training.csv", "per_class_accuracy.json"} <= artifacts

    # The store sits at the project root, never in a stray ./mlruns.
    assert (workdir / "mlflow.db").exists()
    assert any((workdir / "mlartifacts").rglob("MLmodel"))
    assert not (workdir / "mlruns").exists()


def test_logged_model_takes_raw_pixels_and_matches_evaluate(prepared):
    config, _manifest = prepared
    train(config)
    evaluate(config)
    _client, logged = only_run()
    model_uri = f"runs:/{logged.info.run_id}/model"

    info = mlflow.models.get_model_info(model_uri)
    assert "keras" in info.flavors
    assert info.signature.inputs.inputs[0].shape == (-1, 28, 28)
    example = mlflow.models.Model.load(model_uri).load_input_example(
        mlflow.artifacts.download_artifacts(model_uri)
    )
    assert np.asarray(example).shape == (1, 28, 28)

    images, labels = load_split("test")
    probabilities = mlflow.pyfunc.load_model(model_uri).predict(images.astype(np.float32))
    with PREDICTIONS_FILE.open() as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["actual"]) for row in rows] == labels.tolist()
    assert [int(row["predicted"]) for row in rows] == np.argmax(probabilities, axis=1).tolist()


@pytest.mark.parametrize(
    ("exception", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_a_run_that_does_not_finish_is_never_left_running(workdir, exception, status):
    use_experiment(MlflowConfig())
    with pytest.raises(type(exception)), active_run():
        raise exception
    _client, logged = only_run()
    assert logged.info.status == status


def test_runs_logging_one_new_dataset_at_the_same_moment_all_record_it(workdir):
    # The race a queued grid or two teammates hit: every run misses the dataset,
    # and all but one then collide inserting it.
    use_experiment(MlflowConfig())
    dataset = mlflow.data.from_numpy(
        np.zeros((4, 28, 28), np.uint8), name="mnist-train", digest="0123456789abcdef"
    )
    runs = 6
    start_together = threading.Barrier(runs)
    errors = []

    def one_run():
        try:
            with mlflow.start_run():  # one active run per thread
                start_together.wait()
                log_dataset(dataset, context="training")
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=one_run) for _ in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    client = MlflowClient()
    logged = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert len(logged) == runs
    for each in logged:
        assert [i.dataset.name for i in each.inputs.dataset_inputs] == ["mnist-train"]
    database = workdir / "mlflow.db"
    with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as connection:
        assert connection.execute("SELECT COUNT(*) FROM datasets").fetchone()[0] == 1


def epochs_logged(database) -> int:
    try:
        with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as connection:
            query = "SELECT COUNT(*) FROM metrics WHERE key = 'loss'"
            return connection.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigterm_during_training_marks_the_run_killed(prepared, workdir):
    config, _manifest = prepared
    raw = dict(config.raw)
    raw["train"] = {**raw["train"], "epochs": 10_000}
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlops", "train"],
        cwd=workdir,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Poll the database read-only: opening it with MLflow while the stage
        # creates it would race its schema migration.
        started = time.monotonic()
        deadline = started + 120
        while time.monotonic() < deadline and not epochs_logged(workdir / "mlflow.db"):
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.2)
        # Ending the run takes a few of the store's writes and the system-metrics
        # thread's stop: bounded by what the start took on this machine now, times 3.
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = process.communicate(timeout=max(60, 3 * (time.monotonic() - started)))
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    _client, logged = only_run()
    assert logged.info.status == "KILLED"
    assert not MODEL_FILE.exists()
    assert not RUN_FILE.exists()


@pytest.mark.heavy
def test_hydra_app_trains_with_command_line_overrides(prepared, workdir):
    (workdir / "conf").symlink_to(REPO_ROOT / "conf")
    mirror_overrides = tiny_overrides(workdir)
    result = run(
        [
            sys.executable,
            "-m",
            "mnist_mlops.pipeline.train",
            *mirror_overrides,
            "train.epochs=1",
            "experiment=cnn_fast",
        ],
        workdir,
        subprocess_env(),
    )
    assert "trained cnn for 1 epochs" in result.stdout
    _client, logged = only_run()
    assert logged.info.status == "FINISHED"
    assert logged.data.params["model.name"] == "cnn"
    assert logged.data.params["optimizer.name"] == "adam"
    assert logged.data.params["train.epochs"] == "1"
    assert list((workdir / "outputs").rglob("model.keras"))
    assert not MODEL_FILE.exists(), "the Hydra app leaves the DVC outputs alone"


def test_hydra_app_rejects_a_bad_override_in_one_line(workdir):
    (workdir / "conf").symlink_to(REPO_ROOT / "conf")
    result = run(
        [sys.executable, "-m", "mnist_mlops.pipeline.train", "train.epochs=0"],
        workdir,
        subprocess_env(),
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "invalid config: train.epochs must be positive, got 0"
    assert os.listdir(workdir) == ["conf"] or "mlflow.db" not in os.listdir(workdir)


# A command's process after its start: the collector's threshold, and whether a
# cycle of garbage made after it is still collected once enough objects are made.
COLLECTOR = """
import gc, json, weakref
from mnist_mlops.__main__ import main
from mnist_mlops.processes import COLLECT_AFTER

try:
    main(["--help"])
except SystemExit:
    pass
class Node:
    pass
node = Node()
node.cycle = node
alive = weakref.ref(node)
del node
kept = [[] for _ in range(2 * COLLECT_AFTER)]
print(json.dumps({"threshold": gc.get_threshold()[0], "cycle_left": alive() is not None}))
"""


def test_a_command_collects_garbage_less_often_and_still_collects_every_cycle():
    from mnist_mlops.processes import COLLECT_AFTER

    result = run([sys.executable, "-c", COLLECTOR], REPO_ROOT, subprocess_env())
    state = json.loads(result.stdout.splitlines()[-1])
    assert state == {"threshold": COLLECT_AFTER, "cycle_left": False}
    assert COLLECT_AFTER > 700  # Python's own


def test_compose_config_applies_overrides():
    assert compose_config("train.epochs=3")["train"]["epochs"] == 3


def test_the_confusion_image_shades_each_cell_by_its_count():
    from mnist_mlops.pipeline import figures

    matrix = np.zeros((10, 10), dtype=np.int64)
    matrix[3, 3], matrix[3, 5] = 50, 25

    def cell_colour(actual: int, predicted: int) -> tuple:
        # A corner of the cell, clear of the count written in its middle.
        left = figures.MARGIN + predicted * figures.CELL + 3
        upper = figures.TOP + actual * figures.CELL + 3
        return image.getpixel((left, upper))

    image = figures.confusion_image(matrix)
    assert cell_colour(3, 3) == (8, 48, 107), "the largest count is the darkest"
    assert cell_colour(0, 0) == (247, 251, 255), "an empty cell is white"
    half = cell_colour(3, 5)
    assert all(
        dark < value < light
        for dark, value, light in zip((8, 48, 107), half, (247, 251, 255), strict=True)
    )
