"""The reference profile: the features and predictions that served traffic is compared with.

The evaluate stage makes it from the validation split with the model it
registers, and keeps it as a DVC output and an artifact of the same MLflow
run, so every registered version carries the reference it should be
compared with. The validation split, not the test split: clean test images
then remain honest in-distribution traffic for checking the monitor itself.

After a retraining on feedback, the recent split (the newest served images
with true digits, never trained on) is the reference when it has at least
`RECENT_REFERENCE_ROWS` images: the model was chosen for that traffic, and
the monitor should then ask whether the traffic has moved away from it, not
whether it is still unlike MNIST.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_mlops.atomic import atomic_path
from mnist_mlops.monitoring.features import FEATURES, image_features

# Where the profile sits among the artifacts of the run that registered the model.
REFERENCE_ARTIFACT_DIR = "reference"
# The fewest recent images that make a reference of their own (the monitor's
# tests need a few hundred on each side).
RECENT_REFERENCE_ROWS = 500


def reference_source(recent_rows: int) -> str:
    """Which split the reference is made from: `recent` when it is big enough, else `validation`."""
    return "recent" if recent_rows >= RECENT_REFERENCE_ROWS else "validation"


def reference_profile(images: np.ndarray, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "features": image_features(images),
        "feature_names": np.array(FEATURES),
        "digit": probabilities.argmax(axis=1).astype(np.int8),
        "top_probability": probabilities.max(axis=1).astype(np.float32),
    }


def save_reference(path: Path, profile: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, **profile)


def load_reference(path: Path) -> dict[str, np.ndarray]:
    """A saved profile, checked to have today's features (never unpickled)."""
    with np.load(path, allow_pickle=False) as archive:
        profile = {name: archive[name] for name in archive.files}
    if tuple(profile["feature_names"].tolist()) != FEATURES:
        raise ValueError(f"{path} holds other features than {', '.join(FEATURES)}")
    return profile
