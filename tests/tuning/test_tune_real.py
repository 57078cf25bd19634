"""A real study: 12 mlp trials on the real MNIST beat the default, and the preset wins the gate."""

import json

import pytest
from mlflow import MlflowClient

from ..conftest import REAL_MNIST, run, subprocess_env
from .test_tune import (
    assert_complete_study,
    embedded_storage,
    finish,
    pipeline_run_id,
    start_workers,
)

STUDY_SECONDS = 1800  # 12 trials took 8 to 9 minutes under the whole suite's load


@pytest.mark.slow
@pytest.mark.timeout(STUDY_SECONDS + 900)  # the study, then the preset's `dvc exp run`
def test_a_real_study_beats_the_default_and_its_preset_becomes_champion(copy_of_real_pipeline):
    """12 mlp trials on real MNIST with 2 workers, after the default pipeline; the preset goes
    through the gate."""
    project = copy_of_real_pipeline
    env = subprocess_env(MNIST_MIRROR=str(REAL_MNIST), PYTHONUNBUFFERED="1")
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    default_run = client.get_run(pipeline_run_id(project))
    default_test = json.loads((project / "reports" / "metrics.json").read_text())["test_accuracy"]

    workers = start_workers(project, env, 2, "real", "--trials", "12")
    outputs = finish(workers, timeout=STUDY_SECONDS)
    study = assert_complete_study(project, embedded_storage(project), "real", 12)
    default_val = default_run.data.metrics["val_accuracy"]
    assert study.best_value > default_val, (study.best_value, default_val, outputs)

    result = run(["dvc", "exp", "run", "-S", "experiment=real"], project, env)
    assert "Running stage 'train'" in result.stdout
    tuned_test = json.loads((project / "reports" / "metrics.json").read_text())["test_accuracy"]
    registry = json.loads((project / "reports" / "registry.json").read_text())
    print(
        f"default: val {default_val:.4f} test {default_test:.4f}; best trial "
        f"{study.best_trial.number}: val {study.best_value:.4f}; its preset: test {tuned_test:.4f}"
    )
    assert tuned_test > default_test
    assert registry["promoted"] and registry["champion_version"] == registry["version"] == 2
