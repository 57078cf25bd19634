"""Calibrated confidence, and the accuracy of unlabelled traffic estimated from it (CBPE).

**Calibration at evaluate.** A softmax network is usually over-confident. A
temperature T is fitted on the validation split: each answer's
probabilities p become softmax(log p / T), and T minimizes the negative
log-likelihood of the true digits (a bounded one-dimensional search).
Temperature scaling, rather than a histogram or isotonic calibrator: one
number, fitted on 6,000 images without over-fitting, that never changes
which digit is answered, so the served answers and their probabilities
stay as they are and only the monitor applies T. The expected calibration
error (15 equal-width bins of the top probability) is reported before and
after, with a reliability diagram.

**Estimated accuracy without labels** (confidence-based performance
estimation, as NannyML's CBPE): with calibrated top probabilities c_i, row
i is right with probability c_i, so a window's expected accuracy is the
mean of c_i. Rows being independent, the number right is Poisson-binomial,
with variance Σ c_i(1 − c_i); the interval is the mean ± 1.96 standard
deviations. The estimate holds while calibration holds: a shift that also
changes how confidence relates to being right (digits unlike any in
training that the model still answers confidently) makes it too high, and
only true digits (realized accuracy) reveal that.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mnist_mlops.paths import CALIBRATION_FILE, RELIABILITY_FILE

BINS = 15
SUMMARY_KEYS = ("temperature", "ece_before", "ece_after", "examples")
_EPSILON = 1e-7
_INK = (20, 20, 20)
Z_95 = 1.96


def calibrated(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row by row."""
    logits = np.log(np.clip(probabilities.astype(np.float64), _EPSILON, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exponentials = np.exp(logits)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray, t: float) -> float:
    chosen = calibrated(probabilities, t)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(chosen, _EPSILON, 1.0)).mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] of least negative log-likelihood (golden-section search on log T)."""
    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    loss = lambda log_t: negative_log_likelihood(probabilities, labels, float(np.exp(log_t)))  # noqa: E731
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(60):
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return float(np.exp((low + high) / 2))


def reliability(top: np.ndarray, correct: np.ndarray) -> list[dict]:
    """Per bin of top probability: its range, rows, mean confidence and accuracy."""
    edges = np.linspace(0.0, 1.0, BINS + 1)
    index = np.clip(np.digitize(top, edges[1:-1]), 0, BINS - 1)
    return [
        {
            "low": float(edges[i]),
            "high": float(edges[i + 1]),
            "rows": int((index == i).sum()),
            "confidence": float(top[index == i].mean()) if (index == i).any() else 0.0,
            "accuracy": float(correct[index == i].mean()) if (index == i).any() else 0.0,
        }
        for i in range(BINS)
    ]


def expected_calibration_error(top: np.ndarray, correct: np.ndarray) -> float:
    bins = reliability(top, correct)
    return float(
        sum(item["rows"] * abs(item["accuracy"] - item["confidence"]) for item in bins)
        / max(len(top), 1)
    )


def calibration_report(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """The temperature fitted on (probabilities, labels) and the calibration error around it."""
    temperature = fit_temperature(probabilities, labels)
    correct = probabilities.argmax(axis=1) == labels
    after = calibrated(probabilities, temperature)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(probabilities.max(axis=1), correct),
        "ece_after": expected_calibration_error(after.max(axis=1), correct),
        "examples": len(labels),
        "bins_before": reliability(probabilities.max(axis=1), correct),
        "bins_after": reliability(after.max(axis=1), correct),
    }


def reliability_png(report: dict) -> bytes:
    """The reliability diagram: accuracy against confidence per bin, before and after.

    Drawn with Pillow, as evaluate's other figures: matplotlib's import alone
    took a tenth of the stage.
    """
    from PIL import Image, ImageDraw, ImageFont

    side, left, top = 400, 60, 50
    image = Image.new("RGB", (left + side + 20, top + side + 50), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + x * side, top + (1 - y) * side

    draw.rectangle((*at(0, 1), *at(1, 0)), outline=(90, 90, 90))
    for tick in np.linspace(0, 1, 6):
        draw.text(
            (at(tick, 0)[0], top + side + 6), f"{tick:.1f}", fill=_INK, font=small, anchor="mt"
        )
        draw.text((left - 6, at(0, tick)[1]), f"{tick:.1f}", fill=_INK, font=small, anchor="rm")
    for step in range(0, 40, 2):  # the diagonal of perfect calibration, dotted
        draw.line((*at(step / 40, step / 40), *at((step + 1) / 40, (step + 1) / 40)), fill="grey")
    title = f"Validation split, T = {report['temperature']:.3f}"
    draw.text((left + side / 2, 14), title, fill=_INK, font=font, anchor="mt")
    draw.text(
        (left + side / 2, top + side + 26),
        "confidence (top probability)",
        fill=_INK,
        font=small,
        anchor="mt",
    )
    draw.text((8, top - 20), "accuracy", fill=_INK, font=small)
    series = (
        ("bins_before", "softmax", (31, 119, 180)),
        ("bins_after", "calibrated", (255, 127, 14)),
    )
    for row, (key, label, colour) in enumerate(series):
        points = [at(item["confidence"], item["accuracy"]) for item in report[key] if item["rows"]]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        ece = report["ece_" + key.split("_")[1]]
        legend_y = top + 12 + row * 18
        draw.rectangle((left + 10, legend_y - 4, left + 22, legend_y + 4), fill=colour)
        draw.text(
            (left + 28, legend_y), f"{label} (ECE {ece:.4f})", fill=_INK, font=small, anchor="lm"
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def estimate(top: np.ndarray) -> dict:
    """The expected accuracy of rows whose calibrated top probabilities are `top`, with 95 %."""
    if not len(top):
        return {"value": None, "low": None, "high": None, "rows": 0}
    value = float(top.mean())
    spread = Z_95 * float(np.sqrt((top * (1 - top)).sum())) / len(top)
    return {
        "value": value,
        "low": max(0.0, value - spread),
        "high": min(1.0, value + spread),
        "rows": len(top),
    }


def per_digit(
    predicted: np.ndarray, top: np.ndarray, truth: np.ndarray | None, reference: np.ndarray
) -> list[dict]:
    """Per predicted digit: traffic share against the reference's, confidence, accuracies."""
    health = []
    for digit in range(10):
        chosen = predicted == digit
        labelled = chosen & (truth >= 0) if truth is not None else np.zeros_like(chosen)
        health.append(
            {
                "digit": digit,
                "share": float(chosen.mean()) if len(chosen) else 0.0,
                "reference_share": float((reference == digit).mean()) if len(reference) else 0.0,
                "mean_confidence": float(top[chosen].mean()) if chosen.any() else None,
                "estimated_accuracy": estimate(top[chosen])["value"],
                "realized_accuracy": float((truth[labelled] == digit).mean())
                if labelled.any()
                else None,
                "labelled_rows": int(labelled.sum()),
            }
        )
    return health


def calibrate(
    probabilities: np.ndarray,
    labels: np.ndarray,
    json_path: Path = CALIBRATION_FILE,
    png_path: Path = RELIABILITY_FILE,
) -> dict:
    """Fit the temperature on the validation split; write the report's JSON and diagram."""
    from mnist_mlops.atomic import atomic_path, write_json

    report = calibration_report(probabilities, labels)
    with atomic_path(png_path) as staging:
        staging.write_bytes(reliability_png(report))
    write_json(json_path, {key: report[key] for key in SUMMARY_KEYS})
    return report


def log_calibration(report: dict, png_path: Path = RELIABILITY_FILE) -> None:
    """Into the active run: the temperature, the errors before and after, the diagram."""
    import mlflow

    mlflow.log_metrics(
        {
            "calibration_temperature": report["temperature"],
            "ece_before": report["ece_before"],
            "ece_after": report["ece_after"],
        }
    )
    mlflow.log_artifact(str(png_path))


def health(probabilities: np.ndarray, reference: dict, truth: np.ndarray | None) -> dict:
    """A window's estimated accuracy and per-digit health, by the reference's temperature.

    A reference from before calibration has none: T = 1, the softmax as it is.
    """
    temperature = float(reference["temperature"]) if "temperature" in reference else 1.0
    adjusted = calibrated(probabilities, temperature)
    top, predicted = adjusted.max(axis=1), adjusted.argmax(axis=1)
    return {
        "temperature": temperature,
        "calibrated": "temperature" in reference,
        "estimated_accuracy": estimate(top),
        "per_digit": per_digit(predicted, top, truth, reference["digit"]),
    }


def estimate_words(estimated: dict) -> str:
    value = estimated["estimated_accuracy"]
    calibrated_or_not = "" if estimated["calibrated"] else ", uncalibrated"
    return (
        f"estimated accuracy {value['value']:.4f} (95 % {value['low']:.4f}–{value['high']:.4f}"
        f"{calibrated_or_not})"
    )


def per_digit_metrics(estimated: dict | None) -> dict[str, float]:
    """share_digit_N, estimated_accuracy_digit_N, realized_accuracy_digit_N (where known)."""
    return {
        f"{name}_digit_{digit['digit']}": digit[name]
        for digit in (estimated or {}).get("per_digit", [])
        for name in ("share", "estimated_accuracy", "realized_accuracy")
        if digit[name] is not None
    }
