"""Lineage: a served request back to the version that answered, its commit, data and champion."""

import json
import subprocess
import sys
import time

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import DatasetInput

from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings, save_feedback
from mnist_mlops.monitoring.snapshot import snapshot
from mnist_mlops.tracking.datasets import DataVersion
from mnist_mlops.tracking.promotion import reconcile

from ..conftest import subprocess_env

MODEL = "mnist-classifier"


def trained_version(client: MlflowClient, experiment: str, commit: str, digest: str, accuracy):
    """A registered version as evaluate leaves one: its run's provenance, the gate's tags."""
    run = client.create_run(experiment)
    run_id = run.info.run_id
    for key, value in {
        "git.commit": commit,
        "git.dirty": "false",
        "data.digest": digest,
        "data.dvc.processed": f"md5-{digest}.dir",
    }.items():
        client.set_tag(run_id, key, value)
    tested_on = DataVersion("mnist-test", "data/processed/test.npz", f"test-{digest}", None)
    client.log_inputs(run_id, [DatasetInput(tested_on.dataset()._to_mlflow_entity(), [])])
    for key, value in {
        "data.content_sha256": f"raw-{digest}",
        "data.sha256.mnist.npz": f"file-{digest}",
        "data.source": "http://127.0.0.1/mirror",
        "optimizer.name": "rmsprop",
        "train.epochs": "5",
    }.items():
        client.log_param(run_id, key, value)
    client.log_text(run_id, "a stand-in model", "model/MLmodel")
    client.set_terminated(run_id)
    tags = {"gate": "passed", "gate.champion": "0", "gate.rule": "test"}
    tags |= {"gate.reason": "better on the test split", "test_accuracy": accuracy}
    version = client.create_model_version(
        MODEL, f"{run.info.artifact_uri}/model", run_id=run_id, tags=tags
    )
    reconcile(client, MODEL, registered=int(version.version))
    return version


def answered(log_dir, version: str, request_id: str, client_id: str = "") -> None:
    log = InferenceLog(LogSettings(log_dir, flush_seconds=0.05), MODEL, version)
    pixels = np.random.default_rng(len(request_id)).integers(0, 256, (2, 28, 28))
    answers = [{"digit": digit, "probabilities": np.eye(10)[digit].tolist()} for digit in (3, 8)]
    assert log.submit_rows(request_id, pixels.astype(np.float32), answers, version, client_id)
    log.close()


def lineage(project, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mnist_mlops", "lineage", *arguments]
    return subprocess.run(
        command, cwd=project, env=subprocess_env(), capture_output=True, text=True
    )


def test_a_request_before_and_after_a_retrain_leads_to_each_version_s_commit_and_data(workdir):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    client.create_registered_model(MODEL)
    experiment = client.create_experiment("mnist")
    log_dir = workdir / "logs/inference"
    trained_version(client, experiment, "a" * 40, "digest-one", "0.970000")
    answered(log_dir, "1", "req-before", client_id="client-7")
    time.sleep(0.05)
    trained_version(client, experiment, "b" * 40, "digest-two", "0.980000")
    answered(log_dir, "2", "req-after")
    save_feedback(log_dir, [("req-before", 0, 3), ("req-before", 1, 5)])
    snapshot(log_dir, workdir / "data/feedback/feedback.npz", track=False)

    before = lineage(workdir, "req-before", "--json")
    assert before.returncode == 0, before.stderr
    found = json.loads(before.stdout)
    assert found["request"]["model_version"] == "1" and found["request"]["digits"] == [3, 8]
    assert found["version"]["git_commit"] == "a" * 40
    assert found["version"]["data"]["processed"]["digest"] == "digest-one"
    assert found["version"]["data"]["raw"]["content_sha256"] == "raw-digest-one"
    assert found["version"]["data"]["dvc_md5"] == {"processed": "md5-digest-one.dir"}
    assert found["version"]["data"]["datasets"] == [
        {"name": "mnist-test", "link": "data/processed/test.npz", "dvc_md5": "test-digest-one"}
    ]
    assert found["version"]["params"] == {"optimizer.name": "rmsprop", "train.epochs": "5"}
    assert found["version"]["gate"]["verdict"] == "passed"
    assert found["feedback"]["true_digits"] == [3, 5]
    assert found["feedback"]["images_in_snapshot"] == 2
    assert (
        found["champion"]["champion_then"] == "1" and "v1 -> v2" in found["champion"]["move_after"]
    )

    after = json.loads(lineage(workdir, "req-after", "--json").stdout)
    assert after["request"]["model_version"] == "2"
    assert after["version"]["git_commit"] == "b" * 40
    assert after["version"]["data"]["processed"]["digest"] == "digest-two"
    assert after["feedback"] == {**after["feedback"], "true_digits": [None, None]}
    assert after["champion"]["champion_then"] == "2" and not after["champion"]["move_after"]

    # The client's own id finds the same request; the text says the same facts.
    text = lineage(workdir, "client-7").stdout
    assert "request req-before (client id client-7)" in text
    assert f"git commit {'a' * 40}" in text and "champion then: v1" in text
    version = lineage(workdir, "v2").stdout
    assert version.startswith(f"{MODEL} v2,") and "processed data digest-two" in version
    assert "DVC data/processed md5-digest-two.dir" in version
    assert "dataset mnist-test test-digest-two (data/processed/test.npz)" in version

    unknown = lineage(workdir, "req-never")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "no request req-never in the inference log" in unknown.stderr
    missing = lineage(workdir, "v9")
    assert missing.returncode == 1 and f"{MODEL} has no version 9" in missing.stderr
