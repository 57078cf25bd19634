"""Temperature scaling and the accuracy estimated from calibrated confidence (CBPE)."""

import numpy as np
import pytest

from mnist_mlops.monitoring.calibration import (
    calibrated,
    calibration_report,
    estimate,
    expected_calibration_error,
    health,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def over_confident(rows: int, sharpness: float, seed: int = 0):
    """Digits drawn from softmax(z), reported as softmax(sharpness · z): over-confident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (rows, 10))
    truth = softmax(logits)
    labels = (truth.cumsum(axis=1) > rng.random((rows, 1))).argmax(axis=1)
    return softmax(sharpness * logits), labels


def test_the_temperature_undoes_over_confidence_and_never_changes_the_answer():
    reported, labels = over_confident(6000, sharpness=2.0)
    report = calibration_report(reported, labels)
    assert report["temperature"] == pytest.approx(2.0, rel=0.1)
    assert report["ece_after"] < report["ece_before"] / 3
    after = calibrated(reported, report["temperature"])
    assert (after.argmax(axis=1) == reported.argmax(axis=1)).all()
    assert np.allclose(after.sum(axis=1), 1.0)
    assert sum(item["rows"] for item in report["bins_after"]) == len(labels)


def test_the_estimate_covers_the_realized_accuracy_of_fresh_windows():
    reported, labels = over_confident(6000, sharpness=2.0)
    temperature = calibration_report(reported, labels)["temperature"]
    covered = 0
    for seed in range(1, 21):
        window, truth = over_confident(500, sharpness=2.0, seed=seed)
        estimated = estimate(calibrated(window, temperature).max(axis=1))
        realized = (window.argmax(axis=1) == truth).mean()
        covered += estimated["low"] <= realized <= estimated["high"]
    # A 95 % interval: 20 windows, at most a few outside.
    assert covered >= 16
    # The softmax as it is would claim far more than the model gets right.
    raw = estimate(window.max(axis=1))["value"]
    assert raw - realized > 0.05


def test_per_digit_health_sees_one_digit_get_worse():
    reported, labels = over_confident(2000, sharpness=1.0)
    reference = {"digit": reported.argmax(axis=1), "temperature": np.float64(1.0)}
    truth = labels.copy()
    predicted = reported.argmax(axis=1)
    truth[predicted == 3] = (predicted[predicted == 3] + 1) % 10  # every 3 answered is wrong
    found = health(reported, reference, truth)
    by_digit = {item["digit"]: item for item in found["per_digit"]}
    assert sum(item["share"] for item in found["per_digit"]) == pytest.approx(1.0)
    assert by_digit[3]["realized_accuracy"] == 0.0
    assert by_digit[4]["realized_accuracy"] > 0.3
    assert found["calibrated"] and found["estimated_accuracy"]["rows"] == len(labels)
    without = health(reported, {"digit": reference["digit"]}, None)
    assert not without["calibrated"] and without["temperature"] == 1.0
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
