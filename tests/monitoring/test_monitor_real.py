"""The monitor on the real MNIST: quiet on clean digits, loud on thick strokes and on noise."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mnist_mlops.model.export import inference_session, predict_probabilities
from mnist_mlops.monitoring.calibration import calibrated, estimate
from mnist_mlops.monitoring.drift import DRIFT, check
from mnist_mlops.monitoring.features import image_features
from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings, save_feedback
from mnist_mlops.monitoring.reference import load_reference

from ..conftest import REPO_ROOT, run, subprocess_env, unavailable

WINDOWS, WINDOW = 100, 500


def thicker(images: np.ndarray) -> np.ndarray:
    """The same digits drawn with a pen one pixel wider on every side (a 3×3 dilation)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    shifted = [
        padded[:, 1 + dy : 29 + dy, 1 + dx : 29 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    ]
    return np.max(shifted, axis=0)


def answers(probabilities: np.ndarray) -> list[dict]:
    return [{"digit": int(row.argmax()), "probabilities": row.tolist()} for row in probabilities]


@pytest.mark.slow
def test_the_monitor_tells_drift_from_clean_digits(copy_of_real_pipeline, tmp_path):
    project = copy_of_real_pipeline
    reference = load_reference(project / "reports" / "reference.npz")
    with np.load(project / "data" / "processed" / "test.npz") as test:
        images, labels = test["images"].astype(np.float32), test["labels"]
    session = inference_session(project / "models" / "model.onnx")
    rng = np.random.default_rng(0)
    traffic = {
        "clean": images,
        "thick": thicker(images),
        "noise": np.clip(images + rng.normal(0, 60, images.shape), 0, 255).astype(np.float32),
    }
    alarms, probabilities = {}, {}
    for kind, batch in traffic.items():
        probabilities[kind] = predict_probabilities(session, batch)
        features = image_features(batch)
        digits, top = probabilities[kind].argmax(axis=1), probabilities[kind].max(axis=1)
        windows = [rng.choice(len(batch), WINDOW, replace=False) for _ in range(WINDOWS)]
        alarms[kind] = sum(
            check(features[rows], digits[rows], top[rows], reference).verdict == DRIFT
            for rows in windows
        )
    print(f"monitor: drift reported in windows of {WINDOW} out of {WINDOWS}: {alarms}")
    assert alarms["clean"] <= 0.05 * WINDOWS
    assert alarms["thick"] >= 0.95 * WINDOWS and alarms["noise"] >= 0.95 * WINDOWS

    # Calibration at evaluate lowered the calibration error on the validation split.
    fitted = json.loads((project / "reports" / "calibration.json").read_text())
    assert fitted["ece_after"] < fitted["ece_before"] and fitted["examples"] > 1000
    assert (project / "reports" / "reliability.png").stat().st_size > 0
    assert float(reference["temperature"]) == pytest.approx(fitted["temperature"])
    # The accuracy estimated without labels against the realized one, windows of 1,000.
    errors, estimates = {}, {}
    for kind in traffic:
        top = calibrated(probabilities[kind], fitted["temperature"]).max(axis=1)
        right = probabilities[kind].argmax(axis=1) == labels
        windows = [rng.choice(len(labels), 1000, replace=False) for _ in range(20)]
        estimates[kind] = [estimate(top[rows])["value"] for rows in windows]
        errors[kind] = float(
            max(
                abs(value - right[rows].mean())
                for value, rows in zip(estimates[kind], windows, strict=True)
            )
        )
    print(f"estimate: largest error over 20 windows of 1,000: {errors}")
    assert errors["clean"] <= 0.03
    # The alert on a real window's estimate: noise fires it, clean digits do not.
    test_accuracy = json.loads((project / "reports" / "metrics.json").read_text())["test_accuracy"]
    cases = {estimates["noise"][0]: True, estimates["clean"][0]: False}
    assert not alert_cases(tmp_path, test_accuracy, cases), cases

    # The whole command on one logged window of each: its exit status, and
    # the realized accuracy from feedback equal to the accuracy computed here.
    for kind, expected_status in (("clean", 0), ("thick", 3)):
        log_dir = tmp_path / kind
        log = InferenceLog(LogSettings(log_dir, flush_seconds=0.05), "mnist-classifier", "1")
        rows = rng.choice(len(images), WINDOW, replace=False)
        for start in range(0, WINDOW, 50):
            chosen = rows[start : start + 50]
            request_id = f"{kind}-{start}"
            log.submit_rows(request_id, traffic[kind][chosen], answers(probabilities[kind][chosen]))
        log.close()
        save_feedback(
            log_dir,
            [
                (f"{kind}-{index // 50 * 50}", index % 50, int(labels[rows[index]]))
                for index in range(WINDOW)
            ],
        )
        command = [
            *(sys.executable, "-m", "mnist_mlops", "monitor", "--log-dir", str(log_dir)),
            *("--reports-dir", str(tmp_path / f"{kind}-reports")),
        ]
        result = run(command, project, subprocess_env(), check=False)
        assert result.returncode == expected_status, result.stdout + result.stderr
        summary = json.loads((tmp_path / f"{kind}-reports" / "summary.json").read_text())
        direct = (probabilities[kind][rows].argmax(axis=1) == labels[rows]).mean()
        assert summary["accuracy"]["rows"] == WINDOW
        assert summary["accuracy"]["value"] == pytest.approx(direct)
        print(result.stdout.strip())


def alert_cases(tmp_path, test_accuracy: float, cases: dict[float, bool]) -> str:
    """promtool's verdict on the real rule: each pushed estimate fires ModelEstimatedAccuracyLow
    exactly when `cases` says so. Returns promtool's failures ("" when it agrees)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool is not installed (Debian: prometheus)")
    rules = REPO_ROOT / "deploy" / "monitoring" / "rules.yml"
    assert rules.is_file(), rules  # promtool only warns about a missing rules file
    tests = []
    for number, (estimated, fires) in enumerate(cases.items()):
        labels = f'{{job="pushgateway", model_version="{number}"}}'
        summary = (
            f"Model version {number}: estimated accuracy {estimated:.3f}, more than 0.05 "
            "below its test accuracy"
        )
        expected = (
            f'[{{exp_labels: {{severity: ticket, job: pushgateway, model_version: "{number}"}}, '
            f'exp_annotations: {{summary: "{summary}"}}}}]'
            if fires
            else "[]"
        )
        tests.append(
            f"""  - interval: 1m
    input_series:
      - series: 'mnist_monitor_test_accuracy{labels}'
        values: "{test_accuracy} {test_accuracy}"
      - series: 'mnist_monitor_estimated_accuracy{labels}'
        values: "{estimated} {estimated}"
    alert_rule_test:
      - eval_time: 1m
        alertname: ModelEstimatedAccuracyLow
        exp_alerts: {expected}
"""
        )
    case = tmp_path / "estimate.test.yml"
    case.write_text(f'rule_files: ["{rules}"]\nevaluation_interval: 1m\ntests:\n' + "".join(tests))
    result = subprocess.run([promtool, "test", "rules", str(case)], capture_output=True, text=True)
    return "" if result.returncode == 0 else result.stdout + result.stderr
