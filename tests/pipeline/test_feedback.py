"""Feedback in the pipeline: preprocess splits it by time, train learns the older part,
evaluate scores the recent part, and the gate judges by it (real stages, real MLflow store)."""

import json
import sys
import time

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mnist_mlops.config import validate
from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings, save_feedback
from mnist_mlops.monitoring.snapshot import write_snapshot
from mnist_mlops.paths import FEEDBACK_SNAPSHOT_FILE, METRICS_FILE, REGISTRY_FILE
from mnist_mlops.pipeline.evaluate import evaluate
from mnist_mlops.pipeline.fetch import fetch
from mnist_mlops.pipeline.preprocess import (
    has_split,
    load_manifest,
    load_split,
    load_weights,
    preprocess,
)
from mnist_mlops.pipeline.train import train
from mnist_mlops.tracking.registry import CHAMPION

from ..conftest import compose_config, run, subprocess_env, tiny_overrides
from ..monitoring.test_inference_log import answers_for
from .test_pipeline import TINY, stages_run

MODEL = "mnist-classifier"


def shifted_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits the served traffic moved to: each class lights a band of columns, not rows."""
    generator = np.random.default_rng(seed)
    labels = (np.arange(count) % 10).astype(np.uint8)
    generator.shuffle(labels)
    images = generator.integers(0, 60, size=(count, 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        images[index, 4:24, 2 + 2 * label : 5 + 2 * label] = 255
    return images, labels


def feedback_snapshot(images: np.ndarray, labels: np.ndarray) -> None:
    """A snapshot as `feedback snapshot` writes it, served one image a second."""
    count = len(labels)
    write_snapshot(
        FEEDBACK_SNAPSHOT_FILE,
        {
            "images": images,
            "labels": labels,
            "time": 1_800_000_000.0 + np.arange(count, dtype=np.float64),
            "request_id": np.array([f"request-{index:04d}" for index in range(count)], "<U64"),
            "position": np.zeros(count, np.int32),
        },
    )


def rows_of(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


@pytest.fixture
def configured(mirror):
    def config(*overrides: str):
        return validate(compose_config(*tiny_overrides(mirror), "train.epochs=3", *overrides))

    return config


def test_without_feedback_the_pipeline_is_as_before(workdir, configured):
    config = configured()
    fetch(config.data)
    manifest = preprocess(config)
    assert set(manifest["examples"]) == {"train", "validation", "test"}
    assert "feedback" not in manifest and not has_split("recent")
    assert load_weights("train") is None
    train(config)
    metrics = evaluate(config)
    assert metrics["recent_examples"] == 0 and "recent_accuracy" not in metrics
    assert json.loads(METRICS_FILE.read_text())["recent_examples"] == 0


def test_feedback_trains_the_older_part_and_the_gate_judges_on_the_recent_part(workdir, configured):
    # v1: trained on MNIST alone, the champion.
    config = configured("registry.test_tolerance=0.05")
    fetch(config.data)
    preprocess(config)
    train(config)
    evaluate(config)
    mnist_train, _ = load_split("train")

    # The traffic moves; 100 served images come back with their true digits.
    feedback_images, feedback_labels = shifted_digits(100, seed=7)
    feedback_snapshot(feedback_images, feedback_labels)
    weighted = configured("registry.test_tolerance=0.05", "feedback.weight=2.0")
    manifest = preprocess(weighted)
    assert manifest["feedback"] == {"snapshot_rows": 100, "train": 80, "recent": 20, "weight": 2.0}
    assert manifest["examples"]["recent"] == 20

    # The newest 20 by serving time are the recent split; training never sees them.
    train_images, train_labels = load_split("train")
    recent_images, recent_labels = load_split("recent")
    assert np.array_equal(recent_images, feedback_images[80:])
    assert np.array_equal(recent_labels, feedback_labels[80:])
    assert not rows_of(recent_images) & rows_of(train_images)
    assert rows_of(feedback_images[:80]) <= rows_of(train_images)
    assert len(train_labels) == len(mnist_train) + 80
    weights = load_weights("train")
    assert weights[: len(mnist_train)].tolist() == [1.0] * len(mnist_train)
    assert weights[len(mnist_train) :].tolist() == [2.0] * 80

    # v2 learns the new digits: better on the recent split, promoted by the recent rule.
    train(weighted)
    metrics = evaluate(weighted)
    assert metrics["recent_examples"] == 20
    registry = json.loads(REGISTRY_FILE.read_text())
    assert registry["before"]["version"] == 1
    assert metrics["recent_accuracy"] > registry["before"]["recent_accuracy"]
    assert registry["promoted"] and registry["reason"].startswith("recent rule: on 20 recent")

    client = MlflowClient()
    version = client.get_model_version(MODEL, "2")
    assert version.tags["gate.rule"] == "recent" and version.tags["gate.champion"] == "1"
    assert float(version.tags["recent_accuracy"]) == pytest.approx(metrics["recent_accuracy"])
    assert "Gate: recent rule" in version.description
    run = client.get_run(version.tags["run_id"])
    assert run.data.metrics["recent_accuracy"] == pytest.approx(metrics["recent_accuracy"])
    assert run.data.metrics["champion_recent_accuracy"] == pytest.approx(
        registry["before"]["recent_accuracy"]
    )
    assert run.data.tags["data.digest"] == load_manifest()["digest"]
    assert run.data.tags["data.feedback.recent"] == "20"
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION).version) == "2"
    # The classifier carries the known digits a following server checks it on.
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}/2").unwrap_python_model()
    with np.load(served.known_digits) as archive:
        assert sorted(archive["labels"].tolist()) == list(range(10))

    # The same model evaluated again ties the champion on the recent split: not promoted.
    evaluate(weighted)
    again = json.loads(REGISTRY_FILE.read_text())
    assert not again["promoted"] and again["champion_version"] == 2
    assert "does not beat the champion's" in again["reason"]


@pytest.mark.heavy
def test_retrain_snapshots_the_feedback_and_reruns_the_pipeline(project, http_mirror, tmp_path):
    params = compose_config(*TINY, "train.epochs=3", "registry.test_tolerance=0.05")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = subprocess_env(MNIST_MIRROR=http_mirror)
    run(["git", "commit", "-qam", "tiny"], project, env)
    run(["dvc", "repro"], project, env)

    log_dir = tmp_path / "log"
    images, labels = shifted_digits(50, seed=3)
    log = InferenceLog(LogSettings(log_dir, flush_seconds=0.02), MODEL, "1")
    for index in range(0, 50, 5):
        batch = images[index : index + 5].astype(np.float32)
        assert log.submit_rows(f"request-{index}", batch, answers_for(batch))
        time.sleep(0.03)  # served one after another: the recent split is the last requests
    log.close()
    save_feedback(
        log_dir,
        [(f"request-{index - index % 5}", index % 5, int(labels[index])) for index in range(50)],
    )

    command = [sys.executable, "-m", "mnist_mlops", "retrain", "--log-dir", str(log_dir)]
    result = run(command, project, env)
    assert result.stdout.startswith("feedback snapshot: 50 images with true digits")
    assert stages_run(result.stdout) == ["preprocess", "train", "evaluate"]
    assert "retrain: v2 " in result.stdout
    assert (
        "recent_accuracy  before" in result.stdout
        and "recent split: the newest 10" in result.stdout
    )
    manifest = json.loads((project / "data/processed/manifest.json").read_text())
    assert manifest["feedback"]["recent"] == 10 and manifest["feedback"]["train"] == 40
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    (feedback_dep,) = [
        dep for dep in lock["stages"]["preprocess"]["deps"] if dep["path"] == "data/feedback"
    ]
    assert feedback_dep["nfiles"] >= 3  # README.md, feedback.npz, its .dvc and .gitignore

    # Nothing new: the snapshot is unchanged and the pipeline up to date.
    again = run(command, project, env)
    assert "(0 new," in again.stdout
    assert "retrain: the pipeline was up to date; no new version" in again.stdout
