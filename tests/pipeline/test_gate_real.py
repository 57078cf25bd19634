"""The robustness suite in the promotion gate, on real MNIST and real training.

A champion trained on digits moved off-centre holds up on the suite's
`shift`; the seed's network, which never saw a moved digit, beats it on the
test split but loses far more than the tolerance on `shift`, and is refused,
by name. Against its twin (the same network and data, another seed) it
loses nothing beyond the tolerance.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mnist_mlops.pipeline.robustness import _shifted
from mnist_mlops.tracking.registry import Gate, Scores, Verdict, held_up

from ..conftest import REAL_MNIST, run, subprocess_env

pytestmark = pytest.mark.slow


def stage(project, name: str, env: dict) -> dict:
    """Run one pipeline stage's command as dvc.yaml does; the gate's record after it."""
    run([sys.executable, "-m", "mnist_mlops", name], project, env)
    return json.loads((project / "reports" / "registry.json").read_text())


def robustness(project) -> dict:
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if key.startswith("robustness_")}


def set_params(project, **sections: dict) -> None:
    """Change params.yaml as a user of the stages would (the stages read it)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def scores_of(project) -> Scores:
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    found = {key.removeprefix("robustness_"): value for key, value in robustness(project).items()}
    return Scores(metrics["test_accuracy"], robustness=found)


def test_the_gate_refuses_a_version_that_loses_on_a_perturbation_and_names_it(
    copy_of_real_pipeline,
):
    project = copy_of_real_pipeline
    env = subprocess_env(MNIST_MIRROR=str(REAL_MNIST))
    seed = scores_of(project)
    gate = Gate(robustness_tolerance=0.1)
    shutil.copytree(project / "models", project.parent / "seed-models")

    # The seed's network against its twin (another seed, the same data): nothing lost
    # beyond the tolerance, so the robustness part of the gate never refuses it.
    set_params(project, train={"seed": 7})
    stage(project, "train", env)
    twin_record = stage(project, "evaluate", env)
    twin = scores_of(project)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_model_version("mnist-classifier", "2").tags["gate.rule"] != "robustness"
    assert twin_record["version"] == 2 and "loses" not in twin_record["reason"]
    eligible = Verdict(True, "test", "as eligible by the test rule")
    assert held_up(eligible, twin, seed, gate) == eligible
    assert held_up(eligible, seed, twin, gate) == eligible

    # A champion that has seen moved digits, in a registered model of its own: trained
    # on every training image shifted by up to 3 pixels (the file replaced, not written
    # through: it may be a link into DVC's cache), for 2 epochs.
    train_file = project / "data" / "processed" / "train.npz"
    with np.load(train_file, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    moved = _shifted(arrays["images"], np.random.default_rng(7))
    arrays["images"] = moved.astype(arrays["images"].dtype)
    staging = train_file.with_name("train.staging.npz")
    np.savez(staging, **arrays)
    os.replace(staging, train_file)
    set_params(project, train={"seed": 42, "epochs": 2}, registry={"model_name": "mnist-shift"})
    stage(project, "train", env)
    first = stage(project, "evaluate", env)
    assert first["version"] == 1 and first["promoted"], first
    shifted = scores_of(project)
    assert shifted.robustness["shift"] > seed.robustness["shift"] + 0.2, shifted
    # The seed's network beats it on the test split, so that the test rule alone would
    # promote it.
    assert seed.test_accuracy > shifted.test_accuracy, (seed, shifted)

    # The seed's network, judged against it: refused, and the gate says where it loses.
    shutil.rmtree(project / "models")
    shutil.copytree(project.parent / "seed-models", project / "models")
    refused = stage(project, "evaluate", env)
    assert refused["version"] == 2 and not refused["promoted"], refused
    assert "test_accuracy" in refused["reason"] and " beats the champion" in refused["reason"]
    assert "loses more than 0.1 to the champion on" in refused["reason"]
    named = refused["reason"].split("to the champion on ", 1)[1].split(" (")[0].split(", ")
    losing = {
        name for name, value in seed.robustness.items() if shifted.robustness[name] - value > 0.1
    }
    assert "shift" in named and set(named) == losing
    assert scores_of(project).robustness == pytest.approx(seed.robustness, abs=1e-4)
    tags = client.get_model_version("mnist-shift", "2").tags
    assert tags["gate.rule"] == "robustness" and tags["gate"] == "failed"
    assert float(tags["robustness.shift"]) == pytest.approx(seed.robustness["shift"])
    assert str(client.get_model_version_by_alias("mnist-shift", "champion").version) == "1"
