"""The served model: raw digit images in, the digit and its probabilities out.

This file is logged with each registered model as MLflow "models from code"
(no pickled objects), so it imports nothing from this project: any
environment with the model's pip requirements can load and serve it.

MLflow's scoring server (`mlflow models serve`) parses a request in any of its
standard formats (`inputs`, `instances`, `dataframe_split`) and enforces the
signature, a batch of 28×28 images; `MnistClassifier` adds what a signature
cannot say (pixel values in 0–255, a non-empty batch under the size limit) and
answers `{"digit": d, "probabilities": [p0, …, p9]}` for each image. Every
rejected request is an MlflowException, which the server turns into a 400
with the message as JSON.

It runs one of two runtimes, whichever model file was logged with it:
- ONNX Runtime on the model that `train` exported and checked against Keras
  (the default): no TensorFlow, a small environment, ~35 µs per image;
- Keras, for architectures that ONNX cannot represent, with `predict_on_batch`
  rather than `predict`: for a handful of images `predict` spends ~40 ms
  building its data pipeline, `predict_on_batch` ~0.4 ms.
"""

import json
import os

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

IMAGE_SHAPE = (28, 28)
MAX_PIXEL = 255
ONNX_ARTIFACT = "onnx_model"
KERAS_ARTIFACT = "keras_model"
SETTINGS_ARTIFACT = "serving_settings"
# One correctly classified test image per digit, which a server following an
# alias checks a new version on before it serves it (serving/follow.py).
KNOWN_DIGITS_ARTIFACT = "known_digits"
DEFAULT_MAX_BATCH_SIZE = 1024


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def as_image_batch(model_input, max_batch_size: int) -> np.ndarray:
    """Check a batch of raw images; return it as float32 of shape (N, 28, 28).

    The scoring server has already applied the signature (shape and type);
    this repeats the shape check for callers that bypass it.
    """
    try:
        images = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError):
        raise bad_request("pixel values must be numbers") from None
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise bad_request(f"expected a batch of 28×28 images, got an array of shape {images.shape}")
    if len(images) == 0:
        raise bad_request("the batch is empty: send at least one image")
    if len(images) > max_batch_size:
        raise bad_request(f"a batch of {len(images)} images is over the limit of {max_batch_size}")
    low, high = float(images.min()), float(images.max())
    # NaN fails both comparisons and an infinity fails one, so a good request
    # costs two reductions; only a bad one is looked at more closely.
    if not (low >= 0 and high <= MAX_PIXEL):
        if not np.isfinite(images).all():
            raise bad_request("pixel values must be finite numbers")
        raise bad_request(
            f"pixel values must be raw intensities in 0–{MAX_PIXEL}, got values in {low:g}–{high:g}"
        )
    return images


class MnistClassifier(PythonModel):
    """Classifies raw MNIST-style digit images with the trained model."""

    def load_context(self, context) -> None:
        settings = {}
        if SETTINGS_ARTIFACT in context.artifacts:
            with open(context.artifacts[SETTINGS_ARTIFACT]) as stream:
                settings = json.load(stream)
        self.max_batch_size = int(settings.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self.known_digits = context.artifacts.get(KNOWN_DIGITS_ARTIFACT)
        if ONNX_ARTIFACT in context.artifacts:
            self.probabilities = _onnx_runtime(context.artifacts[ONNX_ARTIFACT])
        else:
            self.probabilities = _keras_runtime(context.artifacts[KERAS_ARTIFACT])
        # The first call initialises the runtime: do it now, not in the first request.
        self.probabilities(np.zeros((1, *IMAGE_SHAPE), dtype=np.float32))

    # The hint says what MLflow hands over after enforcing the tensor signature,
    # and tells it not to infer a second schema from the hint.
    def predict(self, context, model_input: np.ndarray, params=None) -> list:
        images = as_image_batch(model_input, self.max_batch_size)
        probabilities = self.probabilities(images).astype(np.float64)
        digits = probabilities.argmax(axis=1).tolist()
        rounded = probabilities.round(6).tolist()
        return [
            {"digit": digit, "probabilities": row}
            for digit, row in zip(digits, rounded, strict=True)
        ]


def python_model_of(model):
    """The Python object behind a loaded pyfunc model (an MnistClassifier), or None for one of
    another flavor."""
    try:
        return model.unwrap_python_model()
    except Exception:
        return None


def _onnx_runtime(model_file: str):
    import onnxruntime

    # ONNX Runtime's default thread pool: measured behind the scoring server,
    # a single thread answered single images slower, not faster. Batch scoring
    # on Spark runs a task per core and asks for one thread (MNIST_ONNX_THREADS).
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("MNIST_ONNX_THREADS", "0"))
    session = onnxruntime.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()

    def probabilities(images: np.ndarray) -> np.ndarray:
        return session.run(None, {model_input.name: images})[0]

    return probabilities


def _keras_runtime(model_file: str):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    network = keras.saving.load_model(model_file)

    def probabilities(images: np.ndarray) -> np.ndarray:
        return np.asarray(network.predict_on_batch(images))

    return probabilities


mlflow.models.set_model(MnistClassifier())
