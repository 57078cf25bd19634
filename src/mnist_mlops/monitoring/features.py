"""Features of digit images, computed the same way for the reference profile and for served traffic.

Cheap (a few vectorised passes over the pixels), numpy only, so the model
server computes them for every logged image without the pipeline's libraries.
Each says something a person would notice about a digit: how much ink, where
it sits, how big it is, how thick its strokes are.
"""

from __future__ import annotations

import numpy as np

FEATURES = (
    "mean_intensity",
    "ink_fraction",
    "centroid_x",
    "centroid_y",
    "width",
    "height",
    "stroke_thickness",
)
# A pixel counts as ink from half intensity on.
INK_THRESHOLD = 128


def image_features(images: np.ndarray) -> np.ndarray:
    """A (N, len(FEATURES)) float32 array for N raw 28×28 images with pixels in 0–255."""
    pixels = np.asarray(images, dtype=np.float32)
    if pixels.ndim != 3:
        raise ValueError(f"expected a batch of 2-D images, got an array of shape {pixels.shape}")
    _count, rows, columns = pixels.shape
    ink = pixels >= INK_THRESHOLD
    ink_pixels = ink.sum(axis=(1, 2))
    total = pixels.sum(axis=(1, 2))
    centre_row, centre_column = (rows - 1) / 2, (columns - 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid_x = (pixels.sum(axis=1) @ np.arange(columns)) / total
        centroid_y = (pixels.sum(axis=2) @ np.arange(rows)) / total
    centroid_x = np.where(total > 0, centroid_x, centre_column)
    centroid_y = np.where(total > 0, centroid_y, centre_row)
    width = _extent(ink.any(axis=1))
    height = _extent(ink.any(axis=2))
    # An ink pixel whose four neighbours are all ink is inside a stroke; the
    # others are its edge. Area over half the edge approximates the width of
    # the strokes: about 1 for a one-pixel line, more for thicker pens.
    padded = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    interior = (
        ink
        & padded[:, :-2, 1:-1]
        & padded[:, 2:, 1:-1]
        & padded[:, 1:-1, :-2]
        & padded[:, 1:-1, 2:]
    )
    edge = ink_pixels - interior.sum(axis=(1, 2))
    thickness = np.where(edge > 0, 2 * ink_pixels / np.maximum(edge, 1), 0.0)
    return np.column_stack(
        [
            total / (rows * columns * 255),
            ink_pixels / (rows * columns),
            centroid_x,
            centroid_y,
            width,
            height,
            thickness,
        ]
    ).astype(np.float32)


def _extent(occupied: np.ndarray) -> np.ndarray:
    """How many rows (or columns) lie between the first and the last occupied one, inclusive."""
    any_ink = occupied.any(axis=1)
    first = occupied.argmax(axis=1)
    last = occupied.shape[1] - 1 - occupied[:, ::-1].argmax(axis=1)
    return np.where(any_ink, last - first + 1, 0)
