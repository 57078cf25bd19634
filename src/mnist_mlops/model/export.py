"""The ONNX model: exported from Keras by `train`, scored with ONNX Runtime by `evaluate`.

`export_verified` turns the trained Keras model into `models/model.onnx`, but
only after the export has predicted the whole validation split like Keras
did: the same digit for every image and probabilities within
`MAX_PROBABILITY_DIFFERENCE`. So the artifact that `evaluate` scores and the
server runs is known to be the model that was trained.

`predict_probabilities` needs only onnxruntime and numpy: importing this
module never loads TensorFlow.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mnist_mlops.model.architectures import INFERENCE_BATCH_SIZE

if TYPE_CHECKING:
    import keras
    import onnxruntime

# Float32 arithmetic in another order (fused kernels, other BLAS) moves
# probabilities by ~1e-7; a wrong conversion moves them by far more.
MAX_PROBABILITY_DIFFERENCE = 1e-5


class ExportError(Exception):
    """The ONNX export does not predict what the Keras model predicts."""


def inference_session(model_file: Path | str) -> onnxruntime.InferenceSession:
    import onnxruntime

    return onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])


def predict_probabilities(
    session: onnxruntime.InferenceSession,
    images: np.ndarray,
    batch_size: int = INFERENCE_BATCH_SIZE,
) -> np.ndarray:
    """The model's class probabilities for raw 0–255 images, computed in batches."""
    (model_input,) = session.get_inputs()
    images = images.astype(np.float32, copy=False)
    batches = [
        session.run(None, {model_input.name: images[start : start + batch_size]})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches)


def compare(architecture: str, expected: np.ndarray, exported: np.ndarray) -> float:
    """The largest probability difference; ExportError when the export is not faithful."""
    differing = int((expected.argmax(axis=1) != exported.argmax(axis=1)).sum())
    largest = float(np.abs(expected - exported).max())
    if differing or largest > MAX_PROBABILITY_DIFFERENCE:
        raise ExportError(
            f"the {architecture} model does not export faithfully to ONNX: on the "
            f"{len(expected)} validation images {differing} predicted digit(s) differ and "
            f"probabilities differ by up to {largest:.2g} "
            f"(allowed {MAX_PROBABILITY_DIFFERENCE:g}); set serving.runtime=keras to serve it "
            "with Keras instead"
        )
    return largest


def export_verified(
    network: keras.Model, architecture: str, validation_images: np.ndarray, path: Path
) -> float:
    """Export `network` to ONNX at `path` and check it; return the largest probability difference.

    Raises ExportError when the export predicts differently: write to a
    temporary path (`atomic.atomic_path`), so that only a faithful export
    ever appears under its final name.
    """
    expected = network.predict(validation_images, batch_size=INFERENCE_BATCH_SIZE, verbose=0)
    export(network, path)
    exported = predict_probabilities(inference_session(path), validation_images)
    return compare(architecture, expected, exported)


def export(network: keras.Model, target: Path) -> None:
    """Keras 3's own ONNX export (tf2onnx underneath) of the model's forward pass."""
    with warnings.catch_warnings():
        # tf2onnx probes numpy for aliases that numpy 2 removed; harmless here.
        warnings.filterwarnings("ignore", category=FutureWarning, module="tf2onnx")
        warnings.filterwarnings("ignore", message=".*np.object.*")
        network.export(str(target), format="onnx", verbose=False)
