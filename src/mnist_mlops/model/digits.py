"""A labelled digit (a 28×28 uint8 image, a label in 0–9) and the check every dataset passes.

The raw MNIST splits (stage `preprocess`) and the feedback snapshots of served
traffic (`mnist-mlops feedback snapshot`) are validated by the same function,
so nothing reaches training that the model could not have been asked.
"""

import numpy as np

from mnist_mlops.model.architectures import IMAGE_SHAPE, NUM_CLASSES


class DataError(ValueError):
    """Data that is not valid MNIST: the raw files, or a snapshot of feedback."""


def check_split(name: str, images: np.ndarray, labels: np.ndarray, expected: int | None) -> None:
    """Raise DataError unless this is a well-formed MNIST split."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{name} images: expected uint8 of shape (N, 28, 28), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{name} labels: expected integers of shape (N,), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
        raise DataError(
            f"{name} labels: {len(bad)} outside 0–{NUM_CLASSES - 1} (e.g. {int(bad[0])})"
        )
    if expected is not None and len(labels) != expected:
        raise DataError(f"{name}: expected {expected} examples, got {len(labels)}")
