"""The registry: every evaluated model is a version; the gate decides who is champion."""

import json

import mlflow
import pytest
from mlflow import MlflowClient

from mnist_mlops.paths import REGISTRY_FILE
from mnist_mlops.pipeline.evaluate import evaluate
from mnist_mlops.pipeline.fetch import fetch
from mnist_mlops.pipeline.preprocess import preprocess
from mnist_mlops.pipeline.train import train
from mnist_mlops.tracking.registry import CHALLENGER, CHAMPION, register, should_promote

MODEL = "mnist-classifier"


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promoted"),
    [
        (0.90, None, 0.0, True),
        (0.91, 0.90, 0.0, True),
        (0.90, 0.90, 0.0, False),
        (0.89, 0.90, 0.0, False),
        (0.905, 0.90, 0.01, False),
        (0.92, 0.90, 0.01, True),
    ],
)
def test_gate(candidate, champion, margin, promoted):
    assert should_promote(candidate, champion, margin) is promoted


def test_pipeline_registers_and_the_gate_moves_the_champion(workdir, config):
    fetch(config.data)
    preprocess(config)
    train(config)
    evaluate(config)

    client = MlflowClient()
    first = json.loads(REGISTRY_FILE.read_text())
    recorded_run_id = first.pop("run_id")
    assert first == {"version": 1, "promoted": True, "champion_version": 1}
    version = client.get_model_version(MODEL, "1")
    run = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])[0]
    assert version.tags["run_id"] == run.info.run_id == recorded_run_id
    assert version.tags["data.digest"] == run.data.tags["data.digest"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"])
    assert "trained for 2 epochs" in version.description
    assert run.data.tags["registry.version"] == "1"
    assert int(client.get_model_version_by_alias(MODEL, CHAMPION).version) == 1

    # Register the same classifier again under other accuracies to drive the gate.
    model_uri = version.source
    champion_accuracy = float(version.tags["test_accuracy"])
    worse = register(model_uri, MODEL, champion_accuracy - 0.01, 0.0, {}, "worse")
    assert (worse.version, worse.promoted, worse.champion_version) == (2, False, 1)
    assert "kept as challenger" in worse.reason
    assert int(client.get_model_version_by_alias(MODEL, CHALLENGER).version) == 2
    assert client.get_model_version(MODEL, "2").tags["promotion"].startswith("rejected")

    tie = register(model_uri, MODEL, champion_accuracy, 0.0, {}, "tie")
    assert not tie.promoted

    better = register(model_uri, MODEL, champion_accuracy + 0.001, 0.0, {}, "better")
    assert (better.version, better.promoted) == (4, True)
    assert int(client.get_model_version_by_alias(MODEL, CHAMPION).version) == 4

    margin = register(model_uri, MODEL, champion_accuracy + 0.002, 0.01, {}, "within margin")
    assert not margin.promoted

    champion = mlflow.pyfunc.load_model(f"models:/{MODEL}@{CHAMPION}")
    assert champion.metadata.get_input_schema().inputs[0].shape == (-1, 28, 28)
