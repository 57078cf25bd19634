"""Benchmark: the accuracy estimated without labels against the realized one, on real digits.

Fits the temperature on the validation split as evaluate does, then scores
the project's ONNX export (models/model.onnx, from `make repro`) on the test
split as it is, drawn with thicker strokes (a 3×3 dilation) and with
Gaussian noise (σ = 60): for each, the whole split's realized and estimated
accuracy, and over 100 random windows of 500 and of 1,000 images how often
the 95 % interval held the realized accuracy, and the error (mean, absolute
mean, largest).

    python -m benchmarks.estimate
"""

import numpy as np

from benchmarks.common import PROCESSED, PROJECT, needs_processed_data


def thick(images: np.ndarray, _rng) -> np.ndarray:
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    shifts = [padded[:, i : i + 28, j : j + 28] for i in range(3) for j in range(3)]
    return np.max(shifts, axis=0)


def noisy(images: np.ndarray, rng) -> np.ndarray:
    return np.clip(images + rng.normal(0, 60, images.shape), 0, 255)


def main() -> None:
    from mnist_mlops.model.export import inference_session, predict_probabilities
    from mnist_mlops.monitoring.calibration import calibrated, calibration_report, estimate

    needs_processed_data()
    session = inference_session(PROJECT / "models" / "model.onnx")
    with np.load(PROCESSED / "validation.npz") as validation:
        report = calibration_report(
            predict_probabilities(session, validation["images"]), validation["labels"]
        )
    with np.load(PROCESSED / "test.npz") as test:
        images, labels = test["images"].astype(np.float32), test["labels"]
    temperature = report["temperature"]
    print(
        f"temperature {temperature:.3f}; validation ECE {report['ece_before']:.4f} -> "
        f"{report['ece_after']:.4f}"
    )
    rng = np.random.default_rng(0)
    for name, change in (("clean", lambda x, _r: x), ("thick", thick), ("noise", noisy)):
        probabilities = predict_probabilities(session, change(images, rng).astype(np.float32))
        right = probabilities.argmax(axis=1) == labels
        top = calibrated(probabilities, temperature).max(axis=1)
        print(
            f"{name:6} realized {right.mean():.4f}, estimated {top.mean():.4f} (softmax as it is "
            f"{probabilities.max(axis=1).mean():.4f})"
        )
        for size in (500, 1000):
            covered, errors = 0, []
            for _ in range(100):
                window = rng.choice(len(labels), size, replace=False)
                estimated = estimate(top[window])
                realized = right[window].mean()
                covered += estimated["low"] <= realized <= estimated["high"]
                errors.append(estimated["value"] - realized)
            errors = np.array(errors)
            print(
                f"       100 windows of {size}: interval held {covered}/100, error mean "
                f"{errors.mean():+.4f}, absolute mean {np.abs(errors).mean():.4f}, "
                f"largest {np.abs(errors).max():.4f}"
            )


if __name__ == "__main__":
    main()
