"""The robustness suite: the test split changed in the ways served digits have been seen to change.

A fixed, seeded set of perturbations of the test images, scored at evaluate
for the candidate and for the champion, so that the gate can refuse a
version that would hold up worse on kinds of change already met
(tracking/registry.py). Each perturbation, and why:

- `thick`: strokes thickened by a 3×3 dilation. Pens and scanners differ;
  it is the drift the monitor sees most, and the one that fools the
  accuracy estimate (monitoring/calibration.py).
- `thin`: strokes thinned by a 2×2 erosion: fine pens, light scans.
- `noise`: Gaussian noise of σ = 60: sensor noise, compression.
- `shift`: each digit moved by up to 3 pixels in each direction: digits
  cropped off-centre.
- `rotate`: each digit turned by up to 15° either way: slanted writing.
- `faint`: every pixel at 40 % of its intensity: faint ink, low contrast.

The same seed gives the same images on every machine, so the candidate and
the champion (scored by its own runtime) answer exactly the same questions.
"""

from __future__ import annotations

import functools

import numpy as np

PERTURBATIONS = ("thick", "thin", "noise", "shift", "rotate", "faint")
SEED = 20261204
# A version's tag naming the suite it was scored on; a change to the suite
# changes it, and a champion scored on another suite is scored again.
SUITE_TAG, SUITE = "robustness_suite", f"{','.join(PERTURBATIONS)}@{SEED}:uint8"
IMAGE = 28


def _neighbourhood(images: np.ndarray, size: int) -> list[np.ndarray]:
    padded = np.pad(
        images, ((0, 0), (size // 2, size - 1 - size // 2), (size // 2, size - 1 - size // 2))
    )
    return [padded[:, i : i + IMAGE, j : j + IMAGE] for i in range(size) for j in range(size)]


def _shifted(images: np.ndarray, rng) -> np.ndarray:
    moved = np.zeros_like(images)
    offsets = rng.integers(-3, 4, (len(images), 2))
    padded = np.pad(images, ((0, 0), (3, 3), (3, 3)))
    for index, (down, right) in enumerate(offsets):
        moved[index] = padded[index, 3 - down : 3 - down + IMAGE, 3 - right : 3 - right + IMAGE]
    return moved


def _rotated(images: np.ndarray, rng) -> np.ndarray:
    from PIL import Image

    angles = rng.uniform(-15, 15, len(images))
    turned = [
        np.asarray(Image.fromarray(image).rotate(angle, resample=Image.BILINEAR))
        for image, angle in zip(images, angles, strict=True)
    ]
    return np.stack(turned)


def _rounded(values: np.ndarray) -> np.ndarray:
    """Whole pixels in 0–255 (in place on a float32 array of the caller's making)."""
    if values.dtype == np.uint8:
        return values
    values = np.asarray(values, np.float32)
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def perturbed(images: np.ndarray) -> dict[str, np.ndarray]:
    """Each perturbation of `images` (raw pixels 0–255), as uint8 images, always the same.

    Pixels as a client sends them (whole numbers in 0–255), and a quarter of
    the memory of floats: six copies of the test split are 47 MB, not 188.
    """
    rng = np.random.default_rng(SEED)
    images = _rounded(images)
    noise = images + 60 * rng.standard_normal(images.shape, np.float32)
    suite = {
        "thick": functools.reduce(np.maximum, _neighbourhood(images, 3)),
        "thin": functools.reduce(np.minimum, _neighbourhood(images, 2)),
        "noise": _rounded(noise),
        "shift": _shifted(images, rng),
        "rotate": _rotated(images, rng),
        "faint": _rounded(images * np.float32(0.4)),
    }
    return {name: suite[name] for name in PERTURBATIONS}


def suite_accuracy(digits_of, suite: dict[str, np.ndarray], labels) -> dict[str, float]:
    """The accuracy on each perturbation of `suite` (see `perturbed`); `digits_of(images)`
    answers a batch of float32 images with digits."""
    return {
        name: float((np.asarray(digits_of(changed.astype(np.float32))) == labels).mean())
        for name, changed in suite.items()
    }


def worst_class(labels: np.ndarray, predicted: np.ndarray) -> tuple[int, float]:
    """The digit answered worst (by recall) and its accuracy."""
    accuracies = {
        int(digit): float((predicted[labels == digit] == digit).mean())
        for digit in np.unique(labels)
    }
    digit = min(accuracies, key=accuracies.get)
    return digit, accuracies[digit]


def champion_scores(config, recent_images, recent_labels, suite, test_labels) -> tuple:
    """(the champion, its Scores on this evaluation's splits); (None, None) without one.

    Its test accuracy is the one it was registered with (the test split does
    not change); on the recent split and the robustness `suite` it is scored
    now, by its own runtime (ONNX Runtime for an ONNX champion), through the
    classifier's probabilities when it has them (no answer per image to build).
    """
    import mlflow

    from mnist_mlops.tracking.registry import Scores, current_champion, recorded_scores

    champion = current_champion(mlflow.MlflowClient(), config.registry.model_name)
    if champion is None:
        return None, None
    recorded = recorded_scores(champion)
    no_recent = recent_labels is None or not len(recent_labels)
    # Scored by this same suite at its own evaluation: the test split does not change.
    if no_recent and champion.tags.get(SUITE_TAG) == SUITE and recorded.robustness:
        return champion, Scores(recorded.test_accuracy, robustness=recorded.robustness)
    # Without the scan of every installed package against the model's requirements
    # (a second, each evaluate): the champion was made in this same environment.
    model = mlflow.pyfunc.load_model(
        f"models:/{champion.name}/{champion.version}", suppress_warnings=True
    )
    batch = config.serving.max_batch_size

    from mnist_mlops.model.classifier import python_model_of

    probabilities = getattr(python_model_of(model), "probabilities", None)

    def digits_of(images: np.ndarray) -> np.ndarray:
        if probabilities is not None:
            return probabilities(images.astype(np.float32)).argmax(axis=1)
        return np.array(
            [
                answer["digit"]
                for start in range(0, len(images), batch)
                for answer in model.predict(images[start : start + batch].astype(np.float32))
            ]
        )

    robustness = suite_accuracy(digits_of, suite, test_labels)
    if no_recent:
        return champion, Scores(recorded.test_accuracy, robustness=robustness)
    accuracy = float((digits_of(recent_images) == recent_labels).mean())
    return champion, Scores(recorded.test_accuracy, accuracy, len(recent_labels), robustness)


def before(champion: tuple) -> dict:
    """What the champion was judged on, for reports/registry.json."""
    version, scores = champion
    if version is None:
        return {}
    found = {"version": int(version.version), "test_accuracy": scores.test_accuracy}
    if scores.recent_accuracy is not None:
        found["recent_accuracy"] = scores.recent_accuracy
    return found
