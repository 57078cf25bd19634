"""The whole pipeline through real `dvc repro` and `dvc exp run` in a fresh git repository."""

import csv
import json
import subprocess

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from ..conftest import TINY_DATA, compose_config, run, subprocess_env

STAGES = ("fetch", "preprocess", "train", "evaluate")
TINY = (
    *TINY_DATA,
    "train.batch_size=32",
)


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def runs_in(project):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist")
    return client, client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])


@pytest.mark.heavy
def test_dvc_repro_end_to_end(project, http_mirror):
    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*TINY, "train.epochs=2")))
    env = subprocess_env(MNIST_MIRROR=http_mirror)
    run(["git", "commit", "-qam", "tiny data"], project, env)

    first = run(["dvc", "repro"], project, env)
    assert stages_run(first.stdout) == list(STAGES)
    for output in (
        "data/raw/mnist.npz",
        "data/processed/test.npz",
        "models/model.keras",
        "models/model.onnx",
    ):
        assert (project / output).is_file(), output
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1

    client, runs = runs_in(project)
    assert len(runs) == 1
    logged = runs[0]
    assert logged.info.status == "FINISHED"
    assert logged.data.params["train.epochs"] == "2"
    assert logged.data.params["model.name"] == "mlp"
    assert len(client.get_metric_history(logged.info.run_id, "val_accuracy")) == 2
    assert logged.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    head = run(["git", "rev-parse", "HEAD"], project, env).stdout.strip()
    assert logged.data.tags["git.commit"] == head
    run_file = json.loads((project / "models/mlflow_run.json").read_text())
    assert run_file["run_id"] == logged.info.run_id

    # The first version's model card holds exactly what reports/ and dvc.lock hold.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    card = mlflow.artifacts.load_dict(f"runs:/{logged.info.run_id}/model_card/v1/model_card.json")
    performance = card["quantitative_analysis"]["performance_metrics"]
    assert {
        item["type"]: item["value"] for item in performance if "digit" not in item["slice"]
    } == metrics
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    locked = {
        entry["path"]: entry["md5"]
        for stage in ("fetch", "preprocess")
        for entry in lock[stage].get("outs", []) + lock[stage].get("deps", [])
    }
    carded = {item["link"]: item["dvc_md5"] for item in card["model_parameters"]["data"]}
    for folder in ("data/raw", "data/processed", "data/feedback"):
        assert carded[folder] == locked[folder], folder
    # A split's digest is DVC's address of its content: the cache holds it there.
    tested_on = carded["data/processed/test.npz"]
    assert (project / ".dvc/cache/files/md5" / tested_on[:2] / tested_on[2:]).is_file()

    # The logged model, fed raw pixels, predicts what the evaluate stage recorded.
    model = mlflow.pyfunc.load_model(f"runs:/{logged.info.run_id}/model")
    with np.load(project / "data/processed/test.npz", allow_pickle=False) as arrays:
        images = arrays["images"]
    with (project / "reports/predictions.csv").open() as stream:
        recorded = [int(row["predicted"]) for row in csv.DictReader(stream)]
    assert np.argmax(model.predict(images.astype(np.float32)), axis=1).tolist() == recorded

    second = run(["dvc", "repro"], project, env)
    assert stages_run(second.stdout) == []
    assert "up to date" in second.stdout
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "first run"], project, env)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    third = run(["dvc", "repro"], project, env)
    assert stages_run(third.stdout) == ["train", "evaluate"]
    _client, runs = runs_in(project)
    assert [item.info.status for item in runs] == ["FINISHED", "FINISHED"]
    assert runs[-1].data.params["train.epochs"] == "1"

    # The committed run and the new one, compared by DVC.
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project, env).stdout)
    loss = diff["reports/metrics.json"]["test_loss"]
    assert loss["old"] != loss["new"]
    plots = json.loads(run(["dvc", "plots", "diff", "--json"], project, env).stdout)["data"]
    titles = set(plots)
    assert {"Training curves (loss)", "Training curves (accuracy)"} <= titles, titles
    assert "Confusion matrix (test set)" in titles
    curves = plots["Training curves (loss)"][0]["content"]["data"]["values"]
    assert {row["rev"] for row in curves} == {"HEAD", "workspace"}
    assert {row["field"] for row in curves} == {"loss", "val_loss"}


@pytest.mark.heavy
def test_dvc_exp_run_composes_hydra_overrides(project, http_mirror):
    env = subprocess_env(MNIST_MIRROR=http_mirror)
    overrides = [f"-S{override}" for override in (*TINY, "model=cnn", "optimizer=adam")]
    overrides.append("-Strain.epochs=1")
    result = run(["dvc", "exp", "run", *overrides], project, env)
    assert stages_run(result.stdout) == list(STAGES)

    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["model"]["name"] == "cnn" and params["train"]["epochs"] == 1
    assert params["optimizer"]["name"] == "adam"
    _client, runs = runs_in(project)
    assert len(runs) == 1
    logged = runs[0]
    assert logged.info.status == "FINISHED"
    assert logged.data.params["model.name"] == "cnn"
    experiments = run(["dvc", "exp", "list", "--name-only"], project, env).stdout.split()
    assert logged.data.tags["dvc.exp_name"] in experiments
    baseline = run(["git", "rev-parse", "HEAD"], project, env).stdout.strip()
    assert logged.data.tags["dvc.baseline_rev"] == baseline


def test_a_failing_stage_records_no_output(project, tmp_path):
    broken = tmp_path / "broken-mirror"
    broken.mkdir()
    (broken / "mnist.npz").write_bytes(b"not the data")
    (broken / "SHA256SUMS").write_text(f"{'0' * 64}  mnist.npz\n")
    env = subprocess_env(MNIST_MIRROR=str(broken))
    result = run(["dvc", "repro"], project, env, check=False)
    assert result.returncode != 0
    assert "sha256 mismatch" in result.stderr
    assert not (project / "data/raw").exists()
    assert not (project / "dvc.lock").exists()


def keras_test_accuracy(project) -> float:
    """The Keras model's own accuracy on the test set, to hold the ONNX evaluation against."""
    from mnist_mlops.model.architectures import import_keras

    network = import_keras().saving.load_model(project / "models/model.keras")
    with np.load(project / "data/processed/test.npz", allow_pickle=False) as arrays:
        probabilities = network.predict(arrays["images"], batch_size=1000, verbose=0)
        return float(np.mean(probabilities.argmax(axis=1) == arrays["labels"]))


@pytest.mark.heavy
def test_results_travel_through_the_dvc_remote(project, http_mirror):
    """Push from one clone; a second clone pulls data, model and metrics and runs nothing."""
    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*TINY, "train.epochs=1")))
    env = subprocess_env(MNIST_MIRROR=http_mirror)
    run(["dvc", "repro"], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "results"], project, env)
    pushed = run(["dvc", "push"], project, env)
    assert "pushed" in pushed.stdout
    assert (project.parent / "mnist-mlops-storage").is_dir()

    second = project.parent / "second"
    run(["git", "clone", "-q", str(project), str(second)], project.parent, env)
    assert not (second / "models" / "model.keras").exists()
    run(["dvc", "pull"], second, env)
    for output in ("data/raw/mnist.npz", "data/processed/train.npz", "models/model.onnx"):
        assert (second / output).read_bytes() == (project / output).read_bytes(), output
    status = run(["dvc", "repro"], second, env)
    assert stages_run(status.stdout) == []


@pytest.mark.heavy
def test_git_ignores_what_the_pipeline_generates(project, http_mirror):
    (project / "params.yaml").write_text(yaml.safe_dump(compose_config(*TINY, "train.epochs=1")))
    env = subprocess_env(MNIST_MIRROR=http_mirror)
    run(["dvc", "repro"], project, env)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    changed = {line[3:] for line in status.splitlines()}
    # What a user commits after a run: the lock file, small metrics and plots,
    # and the .gitignore files DVC writes for its outputs.
    assert not {path for path in changed if path.startswith(("data/raw", "data/processed"))}
    assert not {path for path in changed if "mlflow.db" in path or "mlartifacts" in path}
    assert not {path for path in changed if path.startswith("models/")}
    assert "dvc.lock" in changed
