"""`mnist-mlops monitor` on a real MLflow store and a real inference log, tiny data.

The log's rows are the registered champion's real answers, written by the
real writer; the command runs as a user runs it, in a fresh process.
"""

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from mnist_mlops.monitoring.calibration import calibrated
from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings, save_feedback
from mnist_mlops.pipeline.preprocess import load_split

from ..conftest import free_port, run, subprocess_env, train_champion, unavailable

CHAMPION = "models:/mnist-classifier@champion"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny champion (with its reference profile) and the test split, in a project folder."""
    directory = tmp_path_factory.mktemp("monitored")
    uri, images = train_champion(directory)
    previous = Path.cwd()
    try:
        import os

        os.chdir(directory)
        _images, labels = load_split("test")
    finally:
        os.chdir(previous)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(CHAMPION)
    return directory, uri, images.astype(np.float32), labels, model


def log_traffic(log_dir: Path, model, images: np.ndarray, version: str = "1") -> list[str]:
    """Serve `images` to the model in requests of 5 and log them; return the request ids."""
    log = InferenceLog(LogSettings(log_dir, flush_seconds=0.05), "mnist-classifier", version)
    request_ids = []
    for start in range(0, len(images), 5):
        batch = images[start : start + 5]
        request_ids.append(f"request-{version}-{start}")
        assert log.submit_rows(request_ids[-1], batch, model.predict(batch))
    log.close()
    return request_ids


def monitor(project, log_dir: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    directory, uri, *_ = project
    reports = log_dir.parent / f"{log_dir.name}-reports"
    command = [
        *(sys.executable, "-m", "mnist_mlops", "monitor", "--log-dir", str(log_dir)),
        *("--reports-dir", str(reports), *options),
    ]
    result = run(command, directory, subprocess_env(MLFLOW_TRACKING_URI=uri), check=False)
    summary_file = reports / "summary.json"
    return result, json.loads(summary_file.read_text()) if summary_file.exists() else {}


def test_clean_traffic_is_ok_and_its_realized_accuracy_is_exact(project, tmp_path):
    _directory, uri, images, labels, model = project
    log_dir = tmp_path / "clean"
    request_ids = log_traffic(log_dir, model, images)
    # True digits for the first 30 images, by request and position.
    truth = [(request_ids[index // 5], index % 5, int(labels[index])) for index in range(30)]
    save_feedback(log_dir, truth)
    result, summary = monitor(project, log_dir, "--min-rows", "20")
    assert result.returncode == 0, result.stderr
    assert summary["verdict"] == "ok" and summary["rows"] == len(images)
    predicted = np.array([row["digit"] for row in model.predict(images[:30])])
    assert summary["accuracy"]["rows"] == 30
    assert summary["accuracy"]["value"] == pytest.approx((predicted == labels[:30]).mean())
    assert summary["accuracy"]["low"] <= summary["accuracy"]["value"] <= summary["accuracy"]["high"]
    assert result.stdout.startswith(f"monitor: mnist-classifier v1, {len(images)} rows: ok")
    # The accuracy estimated without labels: the mean top probability calibrated by the
    # temperature evaluate fitted (reports/calibration.json), per digit too.
    directory = project[0]
    fitted = json.loads((directory / "reports" / "calibration.json").read_text())
    assert fitted["temperature"] > 0 and fitted["examples"] > 0
    assert (directory / "reports" / "reliability.png").stat().st_size > 0
    answered = np.array([row["probabilities"] for row in model.predict(images)])
    expected = calibrated(answered, fitted["temperature"]).max(axis=1).mean()
    estimated = summary["estimated"]["estimated_accuracy"]
    assert estimated["value"] == pytest.approx(expected, abs=1e-4)
    assert estimated["low"] <= estimated["value"] <= estimated["high"]
    assert f"estimated accuracy {estimated['value']:.4f}" in result.stdout
    per_digit = summary["estimated"]["per_digit"]
    assert sum(item["share"] for item in per_digit) == pytest.approx(1.0)
    assert sum(item["labelled_rows"] for item in per_digit) == 30
    reports = tmp_path / "clean-reports"
    assert {path.name for path in reports.iterdir()} == {
        "summary.json",
        "features.png",
        "report.html",
    }
    assert "Model mnist-classifier v1" in (reports / "report.html").read_text()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mnist-monitoring")
    (latest, *_) = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
    assert latest.data.tags["verdict"] == "ok" and latest.data.tags["model_version"] == "1"
    assert latest.data.metrics["rows"] == len(images)
    assert latest.data.metrics["accuracy"] == pytest.approx(summary["accuracy"]["value"])
    assert latest.data.metrics["estimated_accuracy"] == pytest.approx(estimated["value"])
    assert (
        "share_digit_0" in latest.data.metrics
        and "estimated accuracy" in (reports / "report.html").read_text()
    )
    artifacts = {item.path for item in client.list_artifacts(latest.info.run_id, "monitoring")}
    assert "monitoring/report.html" in artifacts


def test_noise_is_drift_and_reaches_a_pushgateway(project, tmp_path):
    model = project[4]
    noise = np.random.default_rng(0).integers(0, 256, (40, 28, 28)).astype(np.float32)
    log_dir = tmp_path / "noise"
    log_traffic(log_dir, model, noise)
    gateway_binary = shutil.which("prometheus-pushgateway")
    if not gateway_binary:
        unavailable("prometheus-pushgateway is not installed (Debian: prometheus-pushgateway)")
    port = free_port()
    gateway = subprocess.Popen(
        [gateway_binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Pushgateway did not start"
                time.sleep(0.2)
        options = ("--min-rows", "20", "--pushgateway", f"127.0.0.1:{port}")
        result, summary = monitor(project, log_dir, *options)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            pushed = answer.read().decode()
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)
    assert result.returncode == 3, result.stderr
    assert summary["verdict"] == "drift" and "mean_intensity" in summary["drifted"]
    assert "drift in mean_intensity" in result.stdout
    # Where the report is, and the runbook's next step.
    assert f"report {log_dir.parent / f'{log_dir.name}-reports' / 'report.html'}" in result.stdout
    assert "next: send the true digits back" in result.stdout and "make retrain" in result.stdout
    drift = [line for line in pushed.splitlines() if line.startswith("mnist_monitor_drift{")]
    assert drift and 'model_version="1"' in drift[0] and drift[0].endswith(" 1")
    # What the ModelEstimatedAccuracyLow alert compares, pushed side by side.
    for gauge in ("mnist_monitor_estimated_accuracy{", "mnist_monitor_test_accuracy{"):
        (line,) = [line for line in pushed.splitlines() if line.startswith(gauge)]
        assert 'model_version="1"' in line and 0 < float(line.split()[-1]) <= 1


def test_too_few_rows_an_empty_log_and_another_version(project, tmp_path):
    _directory, _uri, images, _labels, model = project
    few = tmp_path / "few"
    log_traffic(few, model, images[:10])
    result, summary = monitor(project, few)
    assert result.returncode == 4 and summary["verdict"] == "too few rows"
    line = result.stdout.strip()
    assert line.startswith("monitor: mnist-classifier v1, 10 rows: too few rows (10 of the 200")
    # How long to wait comes from the window's own traffic (10 rows logged within ms).
    assert "at this window's traffic, about " in line and "or lower --min-rows" in line
    assert line.endswith(f"; report {few.parent / 'few-reports' / 'report.html'}")

    empty = tmp_path / "empty"
    empty.mkdir()
    result, summary = monitor(project, empty)
    assert result.returncode == 4 and summary["rows"] == 0

    other = tmp_path / "other"
    log_traffic(other, model, images[:10], version="7")
    result, _summary = monitor(project, other)
    assert result.returncode == 4
    assert result.stdout.strip() == (
        "monitor: mnist-classifier v1, 0 rows: too few rows (0 of the 200 a check needs; wait "
        "for traffic, or lower --min-rows) (the log holds rows of version(s) 7)"
    )


def test_what_a_user_can_fix_gets_one_line(project, tmp_path):
    _directory, uri, images, _labels, model = project
    result, _ = monitor(project, tmp_path / "nowhere")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"mnist-mlops monitor: no inference log at {tmp_path / 'nowhere'}: "
        "serve with --log-dir there"
    )
    log_dir = tmp_path / "log"
    log_traffic(log_dir, model, images[:5])
    result, _ = monitor(project, log_dir, "--since", "yesterday")
    assert result.returncode == 2 and "--since takes a duration" in result.stderr
    result, _ = monitor(project, log_dir, "--model-uri", "models:/no-such-model@champion")
    assert result.returncode == 2 and result.stderr.startswith(
        "mnist-mlops monitor: cannot resolve"
    )

    # The report replaces its folder whole: a folder with other files in it is refused.
    directory, uri, *_ = project
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("mine")
    command = [
        *(sys.executable, "-m", "mnist_mlops", "monitor", "--log-dir", str(log_dir)),
        *("--reports-dir", str(shared)),
    ]
    refused = run(command, directory, subprocess_env(MLFLOW_TRACKING_URI=uri), check=False)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"mnist-mlops monitor: {shared} holds other files (notes.txt): the report replaces "
        "its folder whole, so give --reports-dir a folder of its own"
    )
    assert (shared / "notes.txt").read_text() == "mine"

    # A version registered before monitoring has no reference profile.
    champion = MlflowClient(uri).get_model_version_by_alias("mnist-classifier", "champion")
    artifacts = Path(
        MlflowClient(uri).get_run(champion.run_id).info.artifact_uri.removeprefix("file://")
    )
    hidden = tmp_path / "hidden-reference"
    shutil.move(artifacts / "reference", hidden)
    try:
        result, _ = monitor(project, log_dir)
    finally:
        shutil.move(hidden, artifacts / "reference")
    assert result.returncode == 2
    assert (
        "has no reference profile" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    )
