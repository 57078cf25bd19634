"""The monitor on the real MNIST: quiet on clean digits, loud on thick strokes and on noise."""

import json
import sys

import numpy as np
import pytest

from mnist_mlops.model.export import inference_session, predict_probabilities
from mnist_mlops.monitoring.drift import DRIFT, check
from mnist_mlops.monitoring.features import image_features
from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings, save_feedback
from mnist_mlops.monitoring.reference import load_reference

from ..conftest import run, subprocess_env

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
